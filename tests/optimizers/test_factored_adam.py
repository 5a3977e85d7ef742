"""FactoredAdam (appendix D) against an independent float64 numpy reference."""

import json
import os
import subprocess
import sys
import textwrap

import gin
import keras
from keras import ops
import numpy as np
import pytest

from moe_keras.layers import HierarchicalSparseMoE
from moe_keras.layers import SparseMoE
from moe_keras.optimizers import factored_adam as fa

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

LR, BETA_1, BETA_2, EPS = 0.01, 0.9, 0.99, 1e-7
N, D_IN, HID, D_OUT = 3, 4, 5, 4


def _np(x):
  return np.asarray(ops.convert_to_numpy(x))


# ---------------------------------------------------------------- reference


def reference_steps(params, grad_steps, factored, lr, beta_1, beta_2, eps):
  """Appendix D optimizer in float64, written from the paper text.

  Expert matrices ([n, rows, cols] stacks, names in `factored`): beta_1 = 0,
  and for each expert e the second moment is outer(r, c) / mean(r) of the
  EMA row means r and column means c of the squared gradients (zero when
  mean(r) = 0). All other parameters: Adam (Kingma & Ba, the efficient form
  lr_t = lr sqrt(1 - beta_2^t) / (1 - beta_1^t), theta -= lr_t m /
  (sqrt(v) + eps)).

  Args:
    params: dict name -> array (not modified).
    grad_steps: list of dicts name -> gradient.
    factored: set of names.
    lr, beta_1, beta_2, eps: hyperparameters.

  Returns:
    (params after the steps, state dict).
  """
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  state = {}
  for t, grads in enumerate(grad_steps, start=1):
    for name, grad in grads.items():
      g = np.asarray(grad, np.float64)
      p = params[name]
      if name in factored:
        if name not in state:
          state[name] = {
              "r": np.zeros(g.shape[:2]),
              "c": np.zeros((g.shape[0], g.shape[2])),
          }
        r, c = state[name]["r"], state[name]["c"]
        lr_t = lr * np.sqrt(1.0 - beta_2**t) / (1.0 - 0.0**t)
        for e in range(g.shape[0]):
          sq = g[e] ** 2
          r[e] = beta_2 * r[e] + (1 - beta_2) * sq.mean(axis=1)
          c[e] = beta_2 * c[e] + (1 - beta_2) * sq.mean(axis=0)
          mean = r[e].mean()
          v_hat = np.outer(r[e], c[e]) / mean if mean > 0 else np.zeros_like(sq)
          p[e] -= lr_t * g[e] / (np.sqrt(v_hat) + eps)
      else:
        if name not in state:
          state[name] = {"m": np.zeros_like(g), "v": np.zeros_like(g)}
        s = state[name]
        s["m"] = beta_1 * s["m"] + (1 - beta_1) * g
        s["v"] = beta_2 * s["v"] + (1 - beta_2) * g**2
        lr_t = lr * np.sqrt(1.0 - beta_2**t) / (1.0 - beta_1**t)
        p -= lr_t * s["m"] / (np.sqrt(s["v"]) + eps)
  return params, state


SHAPES = {
    "expert_kernel_1": (N, D_IN, HID),
    "expert_kernel_2": (N, HID, D_OUT),
    "expert_bias_1": (N, HID),
    "w_gate": (D_IN, N),
    "bias": (D_OUT,),
}
FACTORED = {"expert_kernel_1", "expert_kernel_2"}


def make_problem(seed=0, steps=5):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grad_steps = []
  for t in range(steps):
    grads = {
        k: (
            (rng.normal(size=s) * rng.uniform(0.1, 3.0, size=s)).astype(
                np.float32
            )
        )
        for k, s in SHAPES.items()
    }
    # Expert 0 receives no tokens on the first two steps (zero gradient),
    # expert 2 never: its matrices must not move (no 0/0).
    for k in ("expert_kernel_1", "expert_kernel_2", "expert_bias_1"):
      grads[k][2] = 0.0
      if t < 2:
        grads[k][0] = 0.0
    grad_steps.append(grads)
  return params, grad_steps


def run_keras(params, grad_steps, **kwargs):
  variables = [keras.Variable(v, name=k) for k, v in params.items()]
  opt = fa.FactoredAdam(
      learning_rate=LR, beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS, **kwargs
  )
  for grads in grad_steps:
    opt.apply([grads[v.name] for v in variables], variables)
  return {v.name: _np(v) for v in variables}, opt


def test_updates_match_numpy_reference_over_several_steps():
  params, grad_steps = make_problem()
  got, opt = run_keras(params, grad_steps)
  want, state = reference_steps(
      params, grad_steps, FACTORED, LR, BETA_1, BETA_2, EPS
  )
  for name in SHAPES:
    # Compare the parameter change (no cancellation against the init).
    np.testing.assert_allclose(
        got[name] - params[name],
        want[name] - params[name],
        rtol=2e-4,
        atol=1e-6,
        err_msg=name,
    )
  # Never-routed expert: exactly unchanged.
  for name in FACTORED:
    np.testing.assert_array_equal(got[name][2], params[name][2])
  # Slots equal the reference's row / column means.
  for i, name in enumerate(SHAPES):
    if name in FACTORED:
      np.testing.assert_allclose(
          _np(opt._row_velocities[i]), state[name]["r"], rtol=1e-5
      )
      np.testing.assert_allclose(
          _np(opt._col_velocities[i]), state[name]["c"], rtol=1e-5
      )
    else:
      np.testing.assert_allclose(
          _np(opt._momentums[i]), state[name]["m"], rtol=1e-5, atol=1e-7
      )
      np.testing.assert_allclose(
          _np(opt._velocities[i]), state[name]["v"], rtol=1e-5
      )


def test_rank_one_second_moment_is_exact():
  """One step from a rank-1 g^2 = a b^T: V_hat = (1 - beta_2) g^2 exactly, so
  the update is lr * sign(g) / (1 + eps / |g|), i.e. Adam's first step."""
  a = np.array([1.0, 2.0, 0.5], np.float32)
  b = np.array([0.25, 1.0, 4.0, 1.0], np.float32)
  g = (np.sqrt(np.outer(a, b)) * np.array([[1, -1, 1, -1]] * 3))[None]
  g = g.astype(np.float32)
  var = keras.Variable(np.zeros_like(g), name="expert_kernel_1")
  opt = fa.FactoredAdam(learning_rate=LR, beta_2=BETA_2, epsilon=0.0)
  opt.apply([g], [var])
  np.testing.assert_allclose(_np(var), -LR * np.sign(g), rtol=1e-5)


def test_predicate_is_configurable():
  params, grad_steps = make_problem(seed=3, steps=3)
  got, opt = run_keras(
      params, grad_steps, factored_patterns=("expert_kernel_2", "w_gate")
  )
  want, _ = reference_steps(
      params,
      grad_steps,
      {"expert_kernel_2"},  # w_gate is rank 2: one [d_in, n] matrix.
      LR,
      BETA_1,
      BETA_2,
      EPS,
  )
  for name in ("expert_kernel_1", "expert_kernel_2", "expert_bias_1"):
    np.testing.assert_allclose(
        got[name] - params[name],
        want[name] - params[name],
        rtol=2e-4,
        atol=1e-6,
    )
  # Rank-2 factored variable = a single matrix: compare with the [1, r, c]
  # reference.
  want_gate, _ = reference_steps(
      {"w": params["w_gate"][None]},
      [{"w": s["w_gate"][None]} for s in grad_steps],
      {"w"},
      LR,
      BETA_1,
      BETA_2,
      EPS,
  )
  np.testing.assert_allclose(
      got["w_gate"] - params["w_gate"],
      want_gate["w"][0] - params["w_gate"],
      rtol=2e-4,
      atol=1e-6,
  )
  assert opt.is_factored(keras.Variable(np.zeros((2, 2)), name="w_gate"))
  assert not opt.is_factored(keras.Variable(np.zeros((2,)), name="w_gate"))


def test_without_factored_variables_equals_keras_adam():
  params, grad_steps = make_problem(seed=5, steps=4)
  got, _ = run_keras(params, grad_steps, factored_patterns=())
  variables = [keras.Variable(v, name=k) for k, v in params.items()]
  adam = keras.optimizers.Adam(
      learning_rate=LR, beta_1=BETA_1, beta_2=BETA_2, epsilon=EPS
  )
  for grads in grad_steps:
    adam.apply([grads[v.name] for v in variables], variables)
  for v in variables:
    np.testing.assert_allclose(got[v.name], _np(v), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- slots


def _moe_model(layer, d=D_IN, t=3, out=2):
  inputs = keras.Input((t, d))
  head = keras.layers.Dense(out, name="head")
  return keras.Model(inputs, head(layer(inputs)))


@pytest.mark.parametrize("hierarchical", [False, True])
def test_slot_shapes_and_bytes(hierarchical):
  if hierarchical:
    layer = HierarchicalSparseMoE(
        num_groups=2,
        experts_per_group=3,
        expert_hidden_dim=HID,
        use_bias=True,
        expert_variables="stacked",
    )
    n = 6
  else:
    layer = SparseMoE(
        num_experts=N,
        k=2,
        expert_hidden_dim=HID,
        use_bias=True,
        expert_variables="stacked",
    )
    n = N
  model = _moe_model(layer)
  opt = fa.FactoredAdam()
  opt.build(model.trainable_variables)
  names = [v.path.split("/")[-1] for v in opt.variables]
  # No first moment for the expert matrices; Adam for everything else.
  assert not any("expert_kernel" in s and "momentum" in s for s in names)
  assert not any(
      "expert_kernel" in s
      and "_velocity" in s
      and "row" not in s
      and "col" not in s
      for s in names
  )
  expected_bytes = {"factored": 0, "adam": 0}
  for i, v in enumerate(model.trainable_variables):
    if "expert_kernel" in v.path:
      r, c = opt._row_velocities[i], opt._col_velocities[i]
      assert tuple(r.shape) == (n,) + tuple(v.shape[1:2])
      assert tuple(c.shape) == (n,) + tuple(v.shape[2:])
      assert r.dtype == "float32" and opt._momentums[i] is None
      expected_bytes["factored"] += 4 * n * (v.shape[1] + v.shape[2])
    else:
      assert opt._row_velocities[i] is None
      assert tuple(opt._momentums[i].shape) == tuple(v.shape)
      assert tuple(opt._velocities[i].shape) == tuple(v.shape)
      expected_bytes["adam"] += 2 * 4 * int(np.prod(v.shape))
  got = opt.state_bytes()
  assert got["factored"] == expected_bytes["factored"]
  assert got["adam"] == expected_bytes["adam"]
  # Versus Adam: expert state shrinks from 2 n d h to n (d + h) per matrix.
  adam = keras.optimizers.Adam()
  adam.build(model.trainable_variables)
  adam_bytes = sum(
      4 * int(np.prod(v.shape)) for v in adam.variables[2:]
  )  # minus iteration, learning_rate
  expert_params = sum(
      int(np.prod(v.shape))
      for v in model.trainable_variables
      if "expert_kernel" in v.path
  )
  assert adam_bytes - got["total"] == 8 * expert_params - got["factored"]


# ---------------------------------------------------------------- training


def _toy_data(seed=0, n=64, t=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, t, D_IN)).astype(np.float32)
  y = np.tanh(2.0 * x[..., :2]).astype(np.float32)
  return x, y


def test_tiny_sparse_moe_trains_with_fit():
  keras.utils.set_random_seed(0)
  layer = SparseMoE(num_experts=4, k=2, expert_hidden_dim=16, seed=0)
  model = _moe_model(layer)
  model.compile(fa.FactoredAdam(learning_rate=0.01), "mse")
  x, y = _toy_data()
  hist = model.fit(x, y, batch_size=16, epochs=15, verbose=0).history["loss"]
  assert np.all(np.isfinite(hist))
  assert hist[-1] < 0.6 * hist[0], hist


# ---------------------------------------------------------------- checkpoints


def _trained_model(seed=0):
  keras.utils.set_random_seed(seed)
  layer = SparseMoE(
      num_experts=4, k=2, expert_hidden_dim=8, gating="top_k", name="moe"
  )
  model = _moe_model(layer)
  model.compile(fa.FactoredAdam(learning_rate=0.01), "mse")
  return model


def _opt_values(model):
  return {v.path: _np(v) for v in model.optimizer.variables}


def test_save_weights_round_trip_restores_slots(tmp_path):
  x, y = _toy_data(1)
  model = _trained_model()
  model.fit(x, y, batch_size=16, epochs=2, verbose=0)
  saved = _opt_values(model)
  assert any("row_velocity" in k for k in saved)
  path = str(tmp_path / "ckpt.weights.h5")
  model.save_weights(path)

  restored = _trained_model(seed=7)  # different init
  # load_weights restores optimizer slots only into a built optimizer
  # (Keras 3 skips them with a warning otherwise).
  restored.optimizer.build(restored.trainable_variables)
  restored.load_weights(path)
  got = _opt_values(restored)
  assert sorted(got) == sorted(saved)
  for k in saved:
    np.testing.assert_array_equal(got[k], saved[k], err_msg=k)
  assert int(_np(restored.optimizer.iterations)) == 8
  # Training continues identically (top_k gating: deterministic).
  model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
  restored.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
  for a, b in zip(model.weights, restored.weights):
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-6, atol=1e-7)


def test_keras_file_round_trip(tmp_path):
  x, y = _toy_data(2)
  model = _trained_model()
  model.fit(x, y, batch_size=16, epochs=2, verbose=0)
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.optimizer, fa.FactoredAdam)
  assert loaded.optimizer.get_config() == model.optimizer.get_config()
  saved, got = _opt_values(model), _opt_values(loaded)
  assert sorted(got) == sorted(saved)
  for k in saved:
    np.testing.assert_array_equal(got[k], saved[k], err_msg=k)


def test_gin_factory():
  gin.clear_config()
  try:
    gin.parse_config(
        "factored_adam.beta_2 = 0.95\n"
        "factored_adam.factored_patterns = ('kernel_2',)\n"
        "factored_adam.global_clipnorm = 1.0\n"
    )
    opt = fa.factored_adam(learning_rate=0.5)
  finally:
    gin.clear_config()
  assert isinstance(opt, fa.FactoredAdam)
  assert opt.beta_2 == 0.95 and opt.factored_patterns == ("kernel_2",)
  assert opt.global_clipnorm == 1.0
  config = opt.get_config()
  assert fa.FactoredAdam.from_config(config).get_config() == config


# ---------------------------------------------------------------- JAX


_JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    assert keras.backend.backend() == "jax"
    from moe_keras.optimizers import factored_adam as fa
    from moe_keras.layers import SparseMoE
    data = np.load(sys.argv[1])
    names = json.loads(sys.argv[2])
    variables = [keras.Variable(data["p_" + k], name=k) for k in names]
    opt = fa.FactoredAdam(learning_rate=%r, beta_1=%r, beta_2=%r, epsilon=%r)
    steps = int(data["steps"])
    for t in range(steps):
      opt.apply([data["g%%d_%%s" %% (t, k)] for k in names], variables)
    np.savez(sys.argv[3], **{k: np.asarray(v.value) for k, v in
                             zip(names, variables)})
    # model.fit under jit (stateless_apply path).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4))
    moe = SparseMoE(num_experts=4, k=2, expert_hidden_dim=8,
                    capacity_factor=2.0, seed=0)
    model = keras.Model(inputs, keras.layers.Dense(2)(moe(inputs)))
    model.compile(fa.FactoredAdam(learning_rate=0.01), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3, 4)).astype("float32")
    y = np.tanh(2 * x[..., :2])
    hist = model.fit(x, y, batch_size=16, epochs=8, verbose=0).history
    print("LOSSES", json.dumps(hist["loss"]))
""") % (LR, BETA_1, BETA_2, EPS)


def test_jax_backend_matches_tensorflow(tmp_path):
  params, grad_steps = make_problem(seed=11, steps=4)
  arrays = {"p_" + k: v for k, v in params.items()}
  for t, grads in enumerate(grad_steps):
    arrays.update({f"g{t}_{k}": v for k, v in grads.items()})
  arrays["steps"] = np.array(len(grad_steps))
  inp, out = str(tmp_path / "in.npz"), str(tmp_path / "out.npz")
  np.savez(inp, **arrays)
  env = dict(
      os.environ,
      KERAS_BACKEND="jax",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
      [sys.executable, "-c", _JAX_SCRIPT, inp, json.dumps(list(SHAPES)), out],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  got_jax = dict(np.load(out))
  got_tf, _ = run_keras(params, grad_steps)
  for name in SHAPES:
    np.testing.assert_allclose(
        got_jax[name] - params[name],
        got_tf[name] - params[name],
        rtol=1e-5,
        atol=1e-7,
        err_msg=name,
    )
  losses = json.loads(
      [l for l in proc.stdout.splitlines() if l.startswith("LOSSES")][0][7:]
  )
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


_FACTORY_SCRIPT = textwrap.dedent("""
    import gin
    from moe_keras.optimizers import factory
    gin.parse_config("make_optimizer.name = 'factored_adam'")
    opt = factory.make_optimizer(learning_rate=0.5, beta_2=0.9)
    print("OPT", type(opt).__name__, opt.beta_2)
""")


def test_make_optimizer_knows_factored_adam_fresh_process():
  """Importing the lead's factory alone registers 'factored_adam'."""
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
      [sys.executable, "-c", _FACTORY_SCRIPT],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OPT FactoredAdam 0.9" in proc.stdout
