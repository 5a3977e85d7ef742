"""Keras layers of the Sparsely-Gated Mixture-of-Experts."""

from moe_keras.layers import gating
from moe_keras.layers.hierarchical_moe import HierarchicalSparseMoE
from moe_keras.layers.sparse_moe import ExpertKernelInitializer
from moe_keras.layers.sparse_moe import SparseMoE

__all__ = [
    "ExpertKernelInitializer",
    "HierarchicalSparseMoE",
    "SparseMoE",
    "gating",
]
