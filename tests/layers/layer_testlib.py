"""Shared helpers of the layer tests: scripts in a fresh process, fixtures.

Backend choice (`KERAS_BACKEND`) happens once per process, so the tests of
the JAX backend (and of process-wide TensorFlow settings) run their checks as
a script in a child process. Imported by the test modules as `layer_testlib`
(a unique name, so it cannot clash with another test directory's helper).
"""

import json
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def run_script(code, *args, backend, timeout=300, **extra_env):
  """Runs `python -c code args` under `backend`; returns the CompletedProcess.

  The child runs in the repository root with the repository and this
  directory (`numpy_reference`) on its path, on CPU (JAX_PLATFORMS=cpu), and
  with TensorFlow's C++ logging quiet unless extra_env says otherwise.

  Args:
    code: the script's source.
    *args: its command-line arguments (strings).
    backend: "jax" or "tensorflow".
    timeout: seconds.
    **extra_env: further environment variables of the child.

  Returns:
    subprocess.CompletedProcess with text stdout and stderr.
  """
  env = dict(
      os.environ,
      KERAS_BACKEND=backend,
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="2",
      PYTHONPATH=os.pathsep.join(
          [REPO, HERE, os.environ.get("PYTHONPATH", "")]
      ),
  )
  env.update(extra_env)
  return subprocess.run(
      [sys.executable, "-c", code] + list(args),
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def script_result(code, *args, backend, **kwargs):
  """Runs `code` as `run_script` does; returns what it printed as its result.

  Args:
    code, *args, backend, **kwargs: as `run_script`.

  Returns:
    The JSON value after "RESULT " on the last such line of its stdout.

  Raises:
    AssertionError: the script failed or printed no result (with the tail
      of its stderr).
  """
  proc = run_script(code, *args, backend=backend, **kwargs)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT ") :])


def backend_result(code, data_path, option, backend):
  """`script_result` of a training script taking (data path, 0/1 option).

  The script's result must name the backend it ran on; it is checked.
  """
  result = script_result(code, data_path, str(int(option)), backend=backend)
  assert result["backend"] == backend
  return result


def weight_arrays(model):
  """{path with '/' as '__': numpy value} of `model`'s weights, seed
  generators' states left out: what the training scripts read back."""
  import keras  # pylint: disable=g-import-not-at-top

  return {
      w.path.replace("/", "__"): keras.ops.convert_to_numpy(w)
      for w in model.weights
      if "seed_generator" not in w.path
  }


# SparseMoE's dropless training step on the JAX backend under jax.jit, with
# MOE_KERAS_JAX_GROUPED_MATMUL set to argv[2] and then argv[3]. The entry
# point `grouped_matmul` of the module argv[1] is counted: it must run for
# both expert matmuls under the first choice (traced once) and never under
# the second. The first choice's output and loss are checked against the
# numpy reference, every gradient against the second choice's.
_DROPLESS_STEP_SCRIPT = textwrap.dedent("""
    import importlib, os, sys
    import numpy as np
    import keras, jax
    assert keras.backend.backend() == "jax"
    from moe_keras.layers import SparseMoE
    import numpy_reference as ref

    module = importlib.import_module(sys.argv[1])
    first, second = sys.argv[2:4]
    calls = []
    entry = module.grouped_matmul
    def counted(*args, **kwargs):
      calls.append(tuple(args[1].shape))
      return entry(*args, **kwargs)
    module.grouped_matmul = counted

    rng = np.random.default_rng(5)
    n, k, N, D, H = 6, 2, 40, 16, 32
    w = ref.random_flat_weights(rng, D, n, H, D, gate_scale=2.0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    noise = rng.normal(size=(N, n)).astype(np.float32)
    layer = SparseMoE(num_experts=n, k=k, expert_hidden_dim=H, use_bias=True)
    layer.build((None, D))
    ref.assign_weights(layer, w)
    want = ref.sparse_moe(x, w, k, noise=noise)
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def loss_fn(tv, x, noise):
      y, _, losses = layer.stateless_call(tv, ntv, x, training=True,
                                          noise=noise, return_losses=True)
      return (y ** 2).sum() + sum(losses), y

    results = {}
    for choice in (first, second):
      os.environ["MOE_KERAS_JAX_GROUPED_MATMUL"] = choice
      jax.clear_caches()
      results[choice] = jax.value_and_grad(loss_fn, has_aux=True)(tv, x, noise)
      assert calls == [(n, D, H), (n, H, D)], (choice, calls)
    (val, y), grads = results[first]
    np.testing.assert_allclose(np.asarray(y), want["output"], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(float(val), float((want["output"] ** 2).sum())
                               + want["total_loss"], rtol=1e-4)
    (_, y_second), grads_second = results[second]
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_second),
                               rtol=1e-5, atol=1e-5)
    for v, g, g_second in zip(layer.trainable_variables, grads, grads_second):
      assert np.any(np.asarray(g) != 0), v.path
      np.testing.assert_allclose(np.asarray(g), np.asarray(g_second),
                                 rtol=1e-4, atol=1e-5, err_msg=v.path)
    print("DROPLESS_STEP_OK")
""")


def check_dropless_step(module, first, second):
  """Runs `_DROPLESS_STEP_SCRIPT` on JAX; asserts that it passed.

  Args:
    module: the grouped matmul module whose `grouped_matmul` must run under
      `first` (e.g. "moe_keras.layers.tiled_grouped_matmul").
    first: the MOE_KERAS_JAX_GROUPED_MATMUL choice under test.
    second: the choice its gradients are compared with (not `module`'s).
  """
  proc = run_script(
      _DROPLESS_STEP_SCRIPT, module, first, second, backend="jax", timeout=600
  )
  assert proc.returncode == 0 and "DROPLESS_STEP_OK" in proc.stdout, (
      proc.stdout + proc.stderr[-4000:]
  )


def reference_layer(weights, *, dim, hidden, num_experts, k, **layer_kwargs):
  """A built SparseMoE holding `weights` (numpy reference's dict).

  Balancing weights w_importance 0.3 and w_load 0.7, so that both losses
  count.

  Args:
    weights: dict as `numpy_reference.random_flat_weights` returns.
    dim: d (input and output).
    hidden: h.
    num_experts: n.
    k: experts per token.
    **layer_kwargs: further SparseMoE arguments.

  Returns:
    the layer, built for [None, dim].
  """
  from moe_keras.layers import SparseMoE  # pylint: disable=g-import-not-at-top
  import numpy_reference as ref  # pylint: disable=g-import-not-at-top

  layer = SparseMoE(
      num_experts=num_experts,
      k=k,
      expert_hidden_dim=hidden,
      w_importance=0.3,
      w_load=0.7,
      **layer_kwargs,
  )
  layer.build((None, dim))
  ref.assign_weights(layer, weights)
  return layer


def flat_layer(rng, *, dim, hidden, num_experts, k, tokens, **layer_kwargs):
  """A built SparseMoE holding the numpy reference's random weights.

  Balancing weights w_importance 0.3 and w_load 0.7, so that both losses
  count. Draws from `rng` in this order: the weights
  (`numpy_reference.random_flat_weights`), the inputs, the noise.

  Args:
    rng: numpy Generator.
    dim: d (input and output).
    hidden: h.
    num_experts: n.
    k: experts per token.
    tokens: N.
    **layer_kwargs: further SparseMoE arguments (use_bias, dispatch_mode,
      expert_variables, ...).

  Returns:
    (layer, weights dict, x float32 [N, d], noise float32 [N, n]).
  """
  import numpy_reference as ref  # pylint: disable=g-import-not-at-top

  use_bias = layer_kwargs.get("use_bias", False)
  w = ref.random_flat_weights(
      rng, dim, num_experts, hidden, dim, use_bias=use_bias
  )
  layer = reference_layer(
      w, dim=dim, hidden=hidden, num_experts=num_experts, k=k, **layer_kwargs
  )
  x = rng.normal(size=(tokens, dim)).astype("float32")
  noise = rng.normal(size=(tokens, num_experts)).astype("float32")
  return layer, w, x, noise


def output_loss_grads(layer, x, noise, graph=False):
  """One training call of `layer` (TensorFlow) and its gradients.

  The objective is sum(y * r) + the layer's losses, r a fixed ramp
  (linspace(-1, 1)) of x's shape (the layer's output dimension must be its
  input's), so that every output element counts differently.

  Args:
    layer: a built MoE layer.
    x: float32 [N, d] numpy array.
    noise: the layer's `noise` argument.
    graph: run the step under tf.function instead of eagerly.

  Returns:
    (y [N, d_out], summed losses (float), {weight name: gradient} as
    `numpy_reference.named_gradients` gives them under either expert
    layout, the input's gradient [N, d]), numpy.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import numpy_reference as ref  # pylint: disable=g-import-not-at-top

  r = tf.constant(
      np.linspace(-1.0, 1.0, x.shape[0] * x.shape[1]).reshape(x.shape),
      tf.float32,
  )
  variables = [v.value for v in layer.trainable_variables]

  def step(x, noise):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True, noise=noise)
      loss = tf.add_n(layer.losses)
      total = tf.reduce_sum(y * r) + loss
    return y, loss, tape.gradient(total, [x] + variables)

  if graph:
    step = tf.function(step)
  y, loss, grads = step(tf.constant(x), noise)
  return (
      y.numpy(),
      float(loss.numpy()),
      ref.named_gradients(layer, grads[1:]),
      grads[0].numpy(),
  )
