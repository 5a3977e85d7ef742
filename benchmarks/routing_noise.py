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


def routing_noise_stats(x, w_gate, w_noise, k, noise_epsilon, rng):
  """Clean vs noisy top-k routing of tokens x (paper eqs. 3-5), in numpy.

  Args:
    x: [N, d] gate inputs (padding already removed).
    w_gate: [d, n] W_g.
    w_noise: [d, n] W_noise.
    k: experts per token.
    noise_epsilon: added to the noise std, as the layer does.
    rng: a numpy Generator for the StandardNormal draws.

  Returns:
    dict: overlap, noise_std, logit_spread, gap (see the module docstring),
    load_clean / load_noisy (max over mean of the k-expert assignments).
  """
  n = w_gate.shape[1]
  clean = x @ w_gate
  std = _softplus(x @ w_noise) + noise_epsilon
  noisy = clean + rng.standard_normal(clean.shape) * std
  # Stable argsort: equal clean logits go to the lowest indices, as any fixed
  # tie order would; the expected overlap for equal logits is then k/n.
  top_clean = np.argsort(-clean, axis=-1, kind="stable")[:, :k]
  top_noisy = np.argsort(-noisy, axis=-1, kind="stable")[:, :k]
  overlap = np.mean(
      [len(set(a) & set(b)) / k for a, b in zip(top_clean, top_noisy)]
  )
  ordered = -np.sort(-clean, axis=-1)
  gap = ordered[:, k - 1] - ordered[:, k] if k < n else np.zeros(len(x))

  def max_over_mean(top):
    return float(np.bincount(top.ravel(), minlength=n).max() * n / top.size)

  return {
      "overlap": float(overlap),
      "noise_std": float(std.mean()),
      "logit_spread": float(clean.std(axis=-1).mean()),
      "gap": float(np.median(gap)),
      "load_clean": max_over_mean(top_clean),
      "load_noisy": max_over_mean(top_noisy),
  }


def _load(model_dir, step):
  """(task, compiled model at `step` or the latest, step, noisy MoE layers)."""
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  task, model, latest = experiment.load_experiment(model_dir)
  if step is not None:
    path = os.path.join(
        model_dir, "checkpoints", f"ckpt-{step}.weights.h5"
    )
    if not os.path.exists(path):
      raise ValueError(f"{model_dir} kept no checkpoint of step {step}")
    model.load_weights(path)
  moes = [
      layer
      for layer in model._flatten_layers()  # pylint: disable=protected-access
      if getattr(layer, "gating", None) == "noisy_top_k"
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
    result[layer.name] = routing_noise_stats(
        x,
        keras.ops.convert_to_numpy(layer.w_gate),
        keras.ops.convert_to_numpy(layer.w_noise),
        layer.k,
        layer.noise_epsilon,
        rng,
    )
    result[layer.name].update(tokens=len(x), n=layer.num_experts)
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
      "| run | step | layer | n | tokens | overlap | noise std | logit"
      " spread | k/k+1 gap | max/mean load clean | noisy |"
      + (" dev ppl clean routing | noisy |" if FLAGS.perplexity_batches else "")
  )
  print(
      "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
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
      print(
          f"| {os.path.basename(model_dir.rstrip('/'))} | {step} | {name} |"
          f" {s['n']} | {s['tokens']} | {s['overlap']:.3f} |"
          f" {s['noise_std']:.3f} | {s['logit_spread']:.3f} | {s['gap']:.3f} |"
          f" {s['load_clean']:.2f} | {s['load_noisy']:.2f} |"
          + (
              f" {s['ppl_clean']:.2f} | {s['ppl_noisy']:.2f} |"
              if "ppl_clean" in s
              else ""
          ),
          flush=True,
      )


if __name__ == "__main__":
  app.run(main)
