"""Distribution: data parallelism plus experts placed across the devices of a mesh (section 3).

`make_distribution(mesh_shape)` is the entry point (see strategy.py);
`Mesh` parses "batch:B,expert:E"; `sharded_experts` holds the TensorFlow
expert placement that `SparseMoE` / `HierarchicalSparseMoE` use;
`colocate_slots` keeps optimizer state on its variable's device;
`jax_cluster` joins several JAX processes into one mesh; `tf_cluster`
connects one TensorFlow client to TF servers on several hosts.
"""

from moe_keras.distribution.jax_cluster import ClusterError
from moe_keras.distribution.jax_cluster import host_local_values
from moe_keras.distribution.jax_cluster import is_primary
from moe_keras.distribution.jax_cluster import lost_process_error
from moe_keras.distribution.jax_cluster import without_distribution
from moe_keras.distribution.mesh import Mesh
from moe_keras.distribution.mesh import parse_mesh_shape
from moe_keras.distribution.optimizer import colocate_slots
from moe_keras.distribution.sharded_experts import logical_weight_signature
from moe_keras.distribution.strategy import Distribution
from moe_keras.distribution.strategy import make_distribution
from moe_keras.distribution.strategy import MeshDataParallel
from moe_keras.distribution.tf_cluster import lost_server_error

__all__ = [
    "ClusterError",
    "Distribution",
    "Mesh",
    "MeshDataParallel",
    "colocate_slots",
    "host_local_values",
    "is_primary",
    "logical_weight_signature",
    "lost_process_error",
    "lost_server_error",
    "make_distribution",
    "parse_mesh_shape",
    "without_distribution",
]
