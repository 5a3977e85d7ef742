"""Sharded experts on 8 logical CPU devices (TensorFlow, in subprocesses)."""

import dist_testlib


def test_sharded_layer_equals_single_device_and_placement():
  """Outputs vs numpy; outputs, losses, gradients vs one device (1e-5);
  expert blocks (flat and hierarchical groups) and Adam slots on the mesh's
  devices."""
  out = dist_testlib.run_scenario("sharded_layer")
  assert "colocate_slots=True: 0/16 slots misplaced" in out


def test_train_step_2x4_equals_single_device():
  out = dist_testlib.run_scenario("train_step")
  assert "ok experts and Adam slots on the mesh devices" in out


def test_resharding_checkpoint():
  """Saved on batch:2,expert:4; restored on 1 device, 1x8 and 4x2."""
  out = dist_testlib.run_scenario("reshard")
  assert "restored on 'batch:4,expert:2' outputs" in out
