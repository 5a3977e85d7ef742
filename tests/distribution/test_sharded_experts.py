"""Sharded experts on 8 logical CPU devices (TensorFlow, in a subprocess).

The scenarios of the selected tests run in one process (`run_scenarios`):
they need the same 8-device split, and they then share TensorFlow's
start-up. Each test passes or fails on its own scenario's output.
"""

import pytest

import dist_testlib

# Test -> the scenario (scenarios.py) it checks.
SCENARIO_OF = {
    "test_sharded_layer_equals_single_device_and_placement": "sharded_layer",
    "test_sharded_recompute_and_expert_dtype_equal_single_device": (
        "sharded_options"
    ),
    "test_train_step_2x4_equals_single_device": "train_step",
    "test_hierarchical_model_on_mesh_equals_single_device": "hier_mesh",
    "test_resharding_checkpoint": "reshard",
    "test_step_device_keeps_gradients_on_their_devices": "step_device",
    "test_squares_taps_on_the_mesh_equal_per_piece_adam": "piece_squares_mesh",
}


@pytest.fixture(scope="module")
def scenarios(request):
  return dist_testlib.run_scenarios(
      dist_testlib.selected_scenarios(request, SCENARIO_OF)
  )


def test_sharded_layer_equals_single_device_and_placement(scenarios):
  """Outputs vs numpy; outputs, losses, gradients vs one device (1e-5);
  expert blocks (flat), secondary gates and experts of hierarchical groups
  and their Adam slots on the mesh's devices."""
  out = scenarios.output("sharded_layer")
  assert "colocate_slots=True: 0/16 slots misplaced" in out
  assert "hier colocate_slots: 0/32 slots misplaced" in out


def test_sharded_recompute_and_expert_dtype_equal_single_device(scenarios):
  """recompute_expert_activations / expert_dtype on a mesh == one device."""
  out = scenarios.output("sharded_options")
  assert "ok hier_recompute_mixed_bf16: expert blocks are float32" in out
  assert "ok bf16_recompute_capacity: expert blocks are bfloat16" in out


def test_train_step_2x4_equals_single_device(scenarios):
  out = scenarios.output("train_step")
  assert "ok experts and Adam slots on the mesh devices" in out


def test_hierarchical_model_on_mesh_equals_single_device(scenarios):
  """Two Adam steps of a hierarchical MoE model on 2x4 == one device; its
  secondary gates, experts and their slots on the group's device; restored
  on 1 device and on 1x2 with the same outputs."""
  out = scenarios.output("hier_mesh")
  assert "restored on 'batch:4,expert:2' outputs" in out


def test_resharding_checkpoint(scenarios):
  """Saved on batch:2,expert:4; restored on 1 device, 1x8 and 4x2."""
  out = scenarios.output("reshard")
  assert "restored on 'batch:4,expert:2' outputs" in out


def test_step_device_keeps_gradients_on_their_devices(scenarios):
  """The TF servers' step (`step_device`) on 1x8: two Adam steps equal one
  device's; in its graph no expert block's weights, gradients or updates
  leave the block's device (Keras's all-reduce of one replica is skipped),
  every gradient op has a device (a variable's sum over the replicas on
  its device), and the batch is split where it is (no device)."""
  out = scenarios.output("step_device")
  assert "ok step_device: no expert block tensor crosses devices" in out


def test_squares_taps_on_the_mesh_equal_per_piece_adam(scenarios):
  """A tapped embedding on 2x4 (FusedAdam, 2 steps) == Keras's per-piece
  Adam without taps on one device; the tap stays zero."""
  out = scenarios.output("piece_squares_mesh")
  assert "ok squares taps on the mesh: per-piece Adam, tap unchanged" in out
