"""Evaluation: perplexity, BLEU (sacrebleu) and expert-utilization statistics."""
