"""The client side of test_tf_cross_host.py (run in its own process).

  python tf_cross_host_scenarios.py client HOST:PORT,HOST:PORT

Connects to the TF servers (`moe_keras.tf_server`, started by the test) and
builds the Dense -> MoE -> Dense model of `scenarios.tiny_model` on
`batch:1,expert:2` over them, flat (dropless, then with a capacity) and
hierarchical. The reference is the same model built plainly in this
process, on its own CPU, outside any distribution code. Checked: outputs,
the loss and the gradient of every weight (expert blocks concatenated)
before training; two Adam steps' losses and the outputs after them; every
variable on the server that should hold it (dense variables, gates and
block 0 on task 0, block 1 on task 1) and every Adam slot beside its
variable.
"""

import os
import re
import sys
import tempfile

import numpy as np

import scenarios

MESH = "batch:1,expert:2"
_BLOCK = re.compile(r"_block(\d+)$")


def _task(device):
  match = re.search(r"/job:worker/replica:0/task:(\d+)/", device)
  return int(match.group(1)) if match else None


def _loss_and_gradients(model, variables, x, y):
  """MSE + model.losses and its gradients by unsharded weight path."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      out = model(x, training=True)
      loss = tf.reduce_mean(tf.square(out - y))
      if model.losses:
        loss += tf.add_n(model.losses)
    return out, loss, tape.gradient(loss, [v.value for v in variables])

  out, loss, grads = step(x, y)
  blocks = {}
  for v, g in zip(variables, grads):
    match = _BLOCK.search(v.path)
    name = _BLOCK.sub("", v.path)
    blocks.setdefault(name, []).append(
        (int(match.group(1)) if match else 0, g.numpy())
    )
  by_name = {
      name: (
          np.concatenate([g for _, g in sorted(parts)], axis=0)
          if len(parts) > 1
          else parts[0][1]
      )
      for name, parts in blocks.items()
  }
  return out.numpy(), float(loss), by_name


def _check_placement(dist, inner, optimizer, label):
  """Block e (and its slots) on task e; everything else on task 0."""
  by_task = {}
  for v in inner.weights:
    task = _task(v.value.device)
    match = _BLOCK.search(v.path)
    want = int(match.group(1)) if match else 0
    assert task == want, (label, v.path, v.value.device)
    by_task.setdefault(task, []).append(v.path)
  on_1 = by_task.get(1, [])
  assert on_1 and all(p.endswith("_block1") for p in on_1), (label, on_1)
  expert_names = {_BLOCK.sub("", p) for p in on_1}
  on_0_blocks = [p for p in by_task[0] if _BLOCK.search(p)]
  assert {_BLOCK.sub("", p) for p in on_0_blocks} == expert_names
  assert all(p.endswith("_block0") for p in on_0_blocks), on_0_blocks
  devices = {v.path.replace("/", "_"): v.value.device for v in inner.weights}
  slots = 0
  for s in optimizer.variables:
    base = re.sub(r"^[^/]*/|_(momentum|velocity)$", "", s.path)
    if base in devices and s.path != base:
      assert s.value.device == devices[base], (label, s.path, s.value.device)
      slots += 1
  assert slots == 2 * len(inner.trainable_weights), (label, slots)
  assert all(_task(d) in (0, 1) for d in dist.mesh.devices)
  print(
      f"ok {label} placement: task 1 holds only {sorted(on_1)};"
      f" {slots} Adam slots beside their variables"
  )


def _halves(model):
  """`model` called on each half of the batch, outputs concatenated.

  The reference for capacity mode: each of the mesh's 2 replicas routes
  its half of the batch with its own capacity (eq. 18 per replica).
  """
  import keras  # pylint: disable=g-import-not-at-top

  class Halves(keras.Model):

    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def call(self, x, training=None):
      half = keras.ops.shape(x)[0] // 2
      return keras.ops.concatenate(
          [
              self.inner(x[:half], training=training),
              self.inner(x[half:], training=training),
          ],
          axis=0,
      )

  return Halves(model)


def _one(servers, label, hierarchical=False, per_replica=False, **moe_kwargs):
  """Compares the model on the servers with the plain one (see module).

  per_replica: the reference runs each replica's half of the batch
  separately (capacity mode).
  """
  import keras  # pylint: disable=g-import-not-at-top

  from moe_keras.distribution import make_distribution  # pylint: disable=g-import-not-at-top

  # Connects first: connecting resets TensorFlow's context, and variables
  # made before it (e.g. a compiled model's loss tracker) break.
  dist = make_distribution(MESH, tf_servers=servers)
  assert dist.kind == "tf_servers", dist.kind
  x, y = scenarios.tiny_data()
  init = os.path.join(tempfile.mkdtemp(), "init.weights.h5")
  single = scenarios.tiny_model(hierarchical=hierarchical, **moe_kwargs)
  single.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  assert all("/job:worker/" not in v.value.device for v in single.weights)
  single.save_weights(init)
  if per_replica:
    single = _halves(single)
    single.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  with dist.scope():
    model = dist.wrap_model(
        scenarios.tiny_model(hierarchical=hierarchical, **moe_kwargs)
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  inner = dist.unwrap(model)
  inner.load_weights(init)
  got = _loss_and_gradients(model, inner.trainable_weights, x, y)
  want = _loss_and_gradients(single, single.trainable_weights, x, y)
  scenarios.check_close(f"{label} outputs", got[0], want[0])
  scenarios.check_close(f"{label} loss", got[1], want[1])
  # Same weights in the same order (layer names differ: the second model
  # of the process gets dense_2, ...).
  assert len(got[2]) == len(want[2]), (list(got[2]), list(want[2]))
  for (name, grad), (want_name, want_grad) in zip(
      got[2].items(), want[2].items()
  ):
    assert name.split("/")[-1] == want_name.split("/")[-1], (name, want_name)
    scenarios.check_close(f"{label} gradient {want_name}", grad, want_grad)
  kwargs = dict(batch_size=16, epochs=2, shuffle=False, verbose=0)
  with dist.scope():  # as experiment.train fits
    history = model.fit(x, y, **kwargs).history
  want_history = single.fit(x, y, **kwargs).history
  print(label, "losses", history["loss"], want_history["loss"])
  scenarios.check_close(
      f"{label} 2 Adam steps' losses", history["loss"], want_history["loss"]
  )
  dropped = {k: v for k, v in history.items() if "dropped" in k}
  if dropped:
    print(f"{label} dropped fraction per step: {dropped}")
  scenarios.check_close(
      f"{label} outputs after 2 steps",
      model.predict(x, batch_size=16, verbose=0),
      single.predict(x, batch_size=16, verbose=0),
  )
  _check_placement(dist, inner, model.optimizer, label)


def scenario_client(servers):
  """Flat (dropless, capacity) and hierarchical MoE on the servers."""
  _one(servers, "flat dropless")
  # Capacity mode (eq. 18): each replica has its own capacity.
  _one(servers, "flat capacity", per_replica=True, capacity_factor=1.0)
  # The hierarchical layer draws its secondary noise on the groups'
  # devices: zeros here (as scenarios.scenario_hier_mesh), everything else
  # as in training.
  with scenarios.zero_gating_noise():
    _one(servers, "hierarchical", hierarchical=True)
  print("ok client")


if __name__ == "__main__":
  globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:])
