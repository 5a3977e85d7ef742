"""Tasks: what an experiment trains and evaluates (language modelling, translation)."""
