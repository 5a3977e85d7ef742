"""JAX: the mesh through keras.distribution (8 XLA host devices)."""

import dist_testlib


def test_jax_expert_sharding_and_step():
  out = dist_testlib.run_scenario("jax_mesh", backend="jax")
  assert "sharding P('expert', None, None)" in out


def test_jax_hierarchical_secondary_gates_with_their_experts():
  out = dist_testlib.run_scenario("jax_hier_mesh", backend="jax")
  assert "ok jax hierarchical" in out
