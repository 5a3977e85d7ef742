"""Optimizers: Adam factory and the factored second-moment Adam of appendix D."""
