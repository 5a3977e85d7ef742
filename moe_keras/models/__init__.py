"""Model builders of the paper: LSTM language models (appendix C) and MoE-GNMT (appendix E)."""
