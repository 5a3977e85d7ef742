"""moe_keras: the Sparsely-Gated Mixture-of-Experts (Shazeer et al. 2017) in Keras 3."""

from moe_keras import tf_allocator

__version__ = "0.1.0"

# Before TensorFlow starts: its BFC CPU allocator (see tf_allocator).
tf_allocator.configure()
