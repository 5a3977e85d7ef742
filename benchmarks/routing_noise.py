r"""How much of a trained MoE's training-time routing the noise decides.

Noisy top-k gating (paper eq. 3-5) picks each token's experts from
`x W_g + StandardNormal() * Softplus(x W_noise)` in training and from the
clean logits `x W_g` at inference. With W_g = W_noise = 0 (the paper's
initialization) every logit starts at 0 and the noise std at softplus(0) =
0.69, so routing starts as a uniformly random choice of k experts; it
becomes the gate's choice only once the clean logits' gap between the k-th
and (k+1)-th expert outgrows the noise. This tool measures, for trained
checkpoints on dev-set tokens:

- `overlap`: the fraction of each token's clean top-k experts that are also
  in its noisy top-k (one noise draw per token): 1 = the gate decides,
  k/n = the noise decides (expected value for equal logits).
- `noise std`, `logit spread` (std over experts of the clean logits),
  `k/k+1 gap` (median gap between the clean k-th and (k+1)-th logit).
- `max/mean load` of clean (inference) and noisy (training) top-k routing.

Hierarchical layers (appendix B, noisy top-k at both levels) route each
token to k_primary groups, then k_secondary experts in each: `overlap` is
then the share of the token's k_primary * k_secondary clean experts that
its noisy routing also picks (both levels' noise drawn as in training;
expected (k_p / a) * (k_s / b) when the noise decides), `group overlap`
the same for its groups alone, and `noise std`, `logit spread` and `k/k+1
gap` are the secondary gate's, inside the token's first clean group (the
level that picks among the b experts).

With `--perplexity_batches=B > 0` it also evaluates the dev perplexity of
each checkpoint on B dev batches twice: with the inference routing (clean
top-k, as every reported perplexity) and with the training routing (noisy
top-k, one noise draw per token, everything else in inference mode: no
dropout, exact softmax). If the experts were trained for the noisy routing
rather than for the gate's choice, the second is the lower one.

  python benchmarks/routing_noise.py DIR[:STEP] [DIR[:STEP] ...]

DIR is a `moe_keras.train` model_dir (LM); `:STEP` picks a kept checkpoint
(`DIR/checkpoints/ckpt-STEP.weights.h5`), default the latest.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_integer("batches", 4, "Dev batches whose tokens are measured.")
flags.DEFINE_integer("noise_seed", 0, "Seed of the noise draws.")
flags.DEFINE_integer(
    "perplexity_batches",
    0,
    "Dev batches for the perplexity with inference vs training routing"
    " (0: not measured).",
)


def _softplus(x):
  return np.logaddexp(0.0, x)


def _top(logits, k):
  """[..., k] indices of the k largest logits.

  Stable: equal logits go to the lowest indices, as any fixed tie order
  would; the expected overlap for equal logits is then k/n.
  """
  return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


def _overlap(top_clean, top_noisy):
  """Mean over tokens of |clean set & noisy set| / set size, [N, k] each."""
  k = top_clean.shape[1]
  return float(
      np.mean([len(set(a) & set(b)) / k for a, b in zip(top_clean, top_noisy)])
  )


def _max_over_mean(top, n):
  """Busiest expert's assignments over the mean, of [N, k] ids in [0, n)."""
  return float(np.bincount(top.ravel(), minlength=n).max() * n / top.size)


def _median_gap(clean, k):
  """Median over tokens of the k-th minus the (k+1)-th clean logit."""
  if k >= clean.shape[-1]:
    return 0.0
  ordered = -np.sort(-clean, axis=-1)
  return float(np.median(ordered[:, k - 1] - ordered[:, k]))


def routing_noise_stats(
    x, w_gate, w_noise, k, noise_epsilon, rng, noise_scale=1.0
):
  """Clean vs noisy top-k routing of tokens x (paper eqs. 3-5), in numpy.

  Args:
    x: [N, d] gate inputs (padding already removed).
    w_gate: [d, n] W_g.
    w_noise: [d, n] W_noise.
    k: experts per token.
    noise_epsilon: added to the noise std, as the layer does.
    rng: a numpy Generator for the StandardNormal draws.
    noise_scale: the layer's multiplier of the noise std (1.0: the paper).

  Returns:
    dict: overlap, noise_std, logit_spread, gap (see the module docstring),
    load_clean / load_noisy (max over mean of the k-expert assignments).
  """
  n = w_gate.shape[1]
  clean = x @ w_gate
  std = noise_scale * (_softplus(x @ w_noise) + noise_epsilon)
  noisy = clean + rng.standard_normal(clean.shape) * std
  top_clean = _top(clean, k)
  top_noisy = _top(noisy, k)
  return {
      "overlap": _overlap(top_clean, top_noisy),
      "noise_std": float(std.mean()),
      "logit_spread": float(clean.std(axis=-1).mean()),
      "gap": _median_gap(clean, k),
      "load_clean": _max_over_mean(top_clean, n),
      "load_noisy": _max_over_mean(top_noisy, n),
  }


def hierarchical_routing_noise_stats(
    x,
    w_gate,
    w_noise,
    w_gate_secondary,
    w_noise_secondary,
    k_primary,
    k_secondary,
    noise_epsilon,
    rng,
    noise_scale=1.0,
):
  """Clean vs noisy two-level routing of tokens x (appendix B), in numpy.

  Args:
    x: [N, d] gate inputs (padding already removed).
    w_gate: [d, a] primary W_g.
    w_noise: [d, a] primary W_noise.
    w_gate_secondary: [a, d, b] the groups' W_g.
    w_noise_secondary: [a, d, b] the groups' W_noise.
    k_primary: groups per token.
    k_secondary: experts per selected group.
    noise_epsilon: added to the noise std, as the layer does.
    rng: a numpy Generator for the StandardNormal draws.
    noise_scale: the layer's multiplier of the noise std (1.0: the paper).

  Returns:
    dict: overlap (of the k_primary * k_secondary experts), group_overlap,
    and the secondary gate's noise_std, logit_spread and gap inside each
    token's first clean group (module docstring); load_clean / load_noisy
    over the a * b experts (expert j of group i is i * b + j).
  """
  a, _, b = w_gate_secondary.shape
  rows = np.arange(len(x))
  clean_p = x @ w_gate
  std_p = noise_scale * (_softplus(x @ w_noise) + noise_epsilon)
  clean_s = np.einsum("nd,adb->nab", x, w_gate_secondary)  # [N, a, b]
  std_s = noise_scale * (
      _softplus(np.einsum("nd,adb->nab", x, w_noise_secondary)) + noise_epsilon
  )

  def route(primary, secondary):
    groups = _top(primary, k_primary)  # [N, kp]
    experts = [
        groups[:, j : j + 1] * b
        + _top(secondary[rows, groups[:, j]], k_secondary)
        for j in range(k_primary)
    ]
    return groups, np.concatenate(experts, axis=1)  # [N, kp * ks]

  groups_clean, top_clean = route(clean_p, clean_s)
  groups_noisy, top_noisy = route(
      clean_p + rng.standard_normal(clean_p.shape) * std_p,
      clean_s + rng.standard_normal(clean_s.shape) * std_s,
  )
  first = groups_clean[:, 0]
  return {
      "overlap": _overlap(top_clean, top_noisy),
      "group_overlap": _overlap(groups_clean, groups_noisy),
      "noise_std": float(std_s[rows, first].mean()),
      "logit_spread": float(clean_s[rows, first].std(axis=-1).mean()),
      "gap": _median_gap(clean_s[rows, first], k_secondary),
      "load_clean": _max_over_mean(top_clean, a * b),
      "load_noisy": _max_over_mean(top_noisy, a * b),
  }


def _is_hierarchical(layer):
  return hasattr(layer, "w_gate_secondary")


def _load(model_dir, step):
  """(task, compiled model at `step` or the latest, step, noisy MoE layers).

  Noisy MoE layers: flat ones with noisy top-k gating and hierarchical ones
  (noisy top-k at both levels).
  """
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  task, model, latest = experiment.load_experiment(model_dir)
  if step is not None:
    path = os.path.join(model_dir, "checkpoints", f"ckpt-{step}.weights.h5")
    if not os.path.exists(path):
      raise ValueError(f"{model_dir} kept no checkpoint of step {step}")
    model.load_weights(path)
  moes = [
      layer
      for layer in model._flatten_layers()  # pylint: disable=protected-access
      if getattr(layer, "gating", None) == "noisy_top_k"
      or _is_hierarchical(layer)
  ]
  if not moes:
    raise ValueError(f"{model_dir} has no noisy top-k MoE layer")
  return task, model, (latest if step is None else step), moes


def routing_perplexities(task, model, moes, batches, seed):
  """Dev perplexity with inference routing and with training routing.

  Args:
    task: the experiment's task (its eval dataset).
    model: the compiled model.
    moes: its noisy top-k MoE layers.
    batches: dev batches evaluated (the same ones both times).
    seed: seed of the training routing's noise draws.

  Returns:
    (perplexity with clean top-k routing, with noisy top-k routing).
  """
  import keras  # pylint: disable=g-import-not-at-top

  dataset = task.eval_dataset().take(batches)
  clean = model.evaluate(dataset, verbose=0, return_dict=True)["perplexity"]
  keras.utils.set_random_seed(seed)
  own = [vars(layer).get("_route") for layer in moes]  # restored after
  for layer in moes:  # the gate of training (eqs. 3-5); the rest inference
    route = layer._route  # pylint: disable=protected-access

    def training_route(tokens, valid, training, noise, _route=route):
      del training
      return _route(tokens, valid, True, noise)

    layer._route = training_route  # pylint: disable=protected-access
  model.test_function = None  # retrace with the patched routing
  try:
    noisy = model.evaluate(dataset, verbose=0, return_dict=True)["perplexity"]
  finally:
    for layer, route in zip(moes, own):
      if route is None:
        del layer._route  # pylint: disable=protected-access
      else:
        layer._route = route  # pylint: disable=protected-access
    model.test_function = None
  return float(clean), float(noisy)


def measure(model_dir, step, batches, rng):
  """(step, {moe layer name: routing_noise_stats} on `batches` dev batches)."""
  import keras  # pylint: disable=g-import-not-at-top

  task, model, step, moes = _load(model_dir, step)
  inputs = {layer.name: [] for layer in moes}
  for layer in moes:  # record each MoE layer's inputs on the forward pass
    call = layer.call

    def recording_call(x, *args, _call=call, _name=layer.name, **kwargs):
      inputs[_name].append(keras.ops.convert_to_numpy(x))
      return _call(x, *args, **kwargs)

    layer.call = recording_call
  for i, batch in enumerate(task.eval_dataset()):
    if i >= batches:
      break
    model(batch[0], training=False)
  result = {}
  for layer in moes:
    x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in inputs[layer.name]])
    x = x[np.abs(x).sum(axis=-1) > 0]  # padding positions are all-zero
    weight = lambda v: keras.ops.convert_to_numpy(v).astype(np.float64)
    if _is_hierarchical(layer):
      stats = hierarchical_routing_noise_stats(
          x,
          weight(layer.w_gate),
          weight(layer.w_noise),
          weight(layer.w_gate_secondary),
          weight(layer.w_noise_secondary),
          layer.k_primary,
          layer.k_secondary,
          layer.noise_epsilon,
          rng,
          layer.noise_scale,
      )
      n = layer.num_groups * layer.experts_per_group
    else:
      stats = routing_noise_stats(
          x,
          weight(layer.w_gate),
          weight(layer.w_noise),
          layer.k,
          layer.noise_epsilon,
          rng,
          layer.noise_scale,
      )
      n = layer.num_experts
    result[layer.name] = dict(stats, tokens=len(x), n=n)
  if FLAGS.perplexity_batches > 0:
    for layer in moes:
      del layer.call  # stop recording (the instance attribute set above)
    clean, noisy = routing_perplexities(
        task, model, moes, FLAGS.perplexity_batches, FLAGS.noise_seed
    )
    for layer in moes:
      result[layer.name].update(ppl_clean=clean, ppl_noisy=noisy)
  return step, result


def main(argv):
  if len(argv) < 2:
    sys.exit("routing_noise.py: error: give at least one model_dir[:step]")
  print(
      "| run | step | layer | n | tokens | overlap | group overlap | noise std"
      " | logit spread | k/k+1 gap | max/mean load clean | noisy |"
      + (" dev ppl clean routing | noisy |" if FLAGS.perplexity_batches else "")
  )
  print(
      "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
      + ("---:|---:|" if FLAGS.perplexity_batches else "")
  )
  for arg in argv[1:]:
    model_dir, _, step = arg.partition(":")
    try:
      step, result = measure(
          model_dir,
          int(step) if step else None,
          FLAGS.batches,
          np.random.default_rng(FLAGS.noise_seed),
      )
    except Exception as e:  # pylint: disable=broad-except
      sys.exit(f"routing_noise.py: error: {model_dir}: {e}".splitlines()[0])
    for name, s in result.items():
      group = f"{s['group_overlap']:.3f}" if "group_overlap" in s else "-"
      perplexities = (
          f" {s['ppl_clean']:.2f} | {s['ppl_noisy']:.2f} |"
          if "ppl_clean" in s
          else ""
      )
      print(
          f"| {os.path.basename(model_dir.rstrip('/'))} | {step} | {name} |"
          f" {s['n']} | {s['tokens']} | {s['overlap']:.3f} | {group} |"
          f" {s['noise_std']:.3f} | {s['logit_spread']:.3f} | {s['gap']:.3f} |"
          f" {s['load_clean']:.2f} | {s['load_noisy']:.2f} |" + perplexities,
          flush=True,
      )


if __name__ == "__main__":
  app.run(main)
