"""JAX: the mesh through keras.distribution (8 XLA host devices).

Both scenarios run in one process (`run_scenarios`, one JAX start-up);
each test passes or fails on its own scenario's output.
"""

import pytest

import dist_testlib

# Test -> the scenario (scenarios.py) it checks.
SCENARIO_OF = {
    "test_jax_expert_sharding_and_step": "jax_mesh",
    "test_jax_hierarchical_secondary_gates_with_their_experts": "jax_hier_mesh",
    "test_jax_squares_taps_on_the_mesh": "jax_piece_squares_mesh",
}


@pytest.fixture(scope="module")
def scenarios(request):
  return dist_testlib.run_scenarios(
      dist_testlib.selected_scenarios(request, SCENARIO_OF), backend="jax"
  )


def test_jax_expert_sharding_and_step(scenarios):
  out = scenarios.output("jax_mesh")
  assert "sharding P('expert', None, None)" in out
  assert "ok jax dropless on the mesh: ragged_dot" in out


def test_jax_hierarchical_secondary_gates_with_their_experts(scenarios):
  out = scenarios.output("jax_hier_mesh")
  assert "ok jax hierarchical" in out


def test_jax_squares_taps_on_the_mesh(scenarios):
  """A tapped embedding on a 2x4 JAX mesh (FusedAdam, 2 steps) == one
  device; the tap stays zero."""
  out = scenarios.output("jax_piece_squares_mesh")
  assert "ok jax squares taps on the mesh == one device, tap unchanged" in out
