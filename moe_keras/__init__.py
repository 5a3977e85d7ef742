"""moe_keras: the Sparsely-Gated Mixture-of-Experts (Shazeer et al. 2017) in Keras 3."""

__version__ = "0.1.0"
