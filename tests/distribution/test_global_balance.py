"""balance_over on 8 logical CPU devices (TensorFlow, in a subprocess).

In-graph meshes (flat MoE on batch:2,expert:4, 8 replicas of unequal
slices; hierarchical on batch:2,expert:2): with 'global' the balancing loss
is the numpy loss of the global batch and equals one device's, and so are
its gradients for every gate weight; 'replica' (the default) is the mean of
the numpy losses of the replicas' slices, the value before the option.
MirroredStrategy with 4 replicas in one process: 'replica' as before,
'global' a one-line ValueError. Several hosts (MultiWorkerMirroredStrategy)
are in test_multi_worker.py.
"""

import dist_testlib


def test_global_balance_equals_one_device_replica_keeps_mean():
  out = dist_testlib.run_scenario("global_balance")
  for line in (
      "ok flat batch:2,expert:4 balance_over=replica loss vs numpy",
      "ok flat batch:2,expert:4 balance_over=global dw_noise vs one device",
      "ok hier batch:2,expert:2 balance_over=global loss vs numpy",
      "ok hier batch:2,expert:2 balance_over=global dw_noise_secondary",
      "ok MirroredStrategy x4 balance_over=replica loss vs numpy",
      "ok MirroredStrategy x4 balance_over=global:",
  ):
    assert line in out, (line, out)
