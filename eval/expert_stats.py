"""Expert-utilization statistics of a trained model's MoE layers.

For every MoE layer of a functional model (SparseMoE, HierarchicalSparseMoE)
this runs the layer on its real inputs over a dataset and accumulates, per
expert, the importance (eq. 6: sum of gates), the load and the number of
tokens routed, then reports CV = std/mean (population std, as the balancing
losses use) and max/mean load, both over the whole split ("aggregate") and
averaged over batches ("per batch", how the paper's Table 6 reports them).

In evaluation (`training=False`) there is no noise, so the load of an expert
is the number of tokens it receives; with `training=True` the noisy gates and
the smooth load estimator of eq. (10) are used, as in a training step.

This module imports no moe_keras model code (only `moe_keras.atomic_file`,
which writes its plots whole): an MoE layer is any Keras layer with
`num_experts` whose `call` takes `return_stats` and then returns
(outputs, stats) with the per-expert STAT_KEYS and "dropped_fraction"
(what `moe_keras.layers.SparseMoE` and `HierarchicalSparseMoE` do).
"""

import inspect
import os

import keras
import numpy as np

from moe_keras import atomic_file

STAT_KEYS = ("importance", "load", "token_counts")


def is_moe_layer(layer):
  """Whether `layer` reports routing statistics (`return_stats=True`)."""
  if not isinstance(layer, keras.layers.Layer) or not hasattr(
      layer, "num_experts"
  ):
    return False
  return "return_stats" in inspect.signature(layer.call).parameters


def moe_layers(model):
  """All MoE layers of `model` (recursively), in model order."""
  found = []
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if is_moe_layer(layer):
      found.append(layer)
  return found


def probe_model(model, layers):
  """The input (and mask) of each MoE layer of a functional model.

  Args:
    model: a functional keras.Model.
    layers: MoE layers of `model` (`moe_layers`), each called once in it.

  Returns:
    (probe, slots): `probe(x)` runs `model`'s inputs `x` (no training) and
    returns a list holding every layer's input, and its mask where the
    layer was called with one; `slots[i]` is (input index, mask index or
    None) of `layers[i]` in that list. A layer called without a mask gets
    none (a symbolic all-True mask cannot be built for inputs of unknown
    length).
  """
  outputs = []
  slots = []
  for layer in layers:
    node = layer._inbound_nodes[0]  # pylint: disable=protected-access
    mask = node.arguments.kwargs.get("mask")
    outputs.append(node.arguments.args[0])
    input_index = len(outputs) - 1
    mask_index = None
    if mask is not None:
      outputs.append(mask)
      mask_index = len(outputs) - 1
    slots.append((input_index, mask_index))
  functional = keras.Model(model.inputs, outputs)

  def probe(x):
    # A one-output functional model returns its tensor, not a list.
    probed = functional(x, training=False)
    return list(probed) if isinstance(probed, (list, tuple)) else [probed]

  return probe, slots


def _cv(x):
  x = np.asarray(x, np.float64)
  mean = x.mean()
  return float(x.std() / mean) if mean > 0 else 0.0


def _max_over_mean(x):
  x = np.asarray(x, np.float64)
  mean = x.mean()
  return float(x.max() / mean) if mean > 0 else 0.0


# The share of routed tokens `experts_for_load_share` counts experts up to.
LOAD_SHARE = 0.9


def experts_for_load_share(token_counts, share=LOAD_SHARE):
  """The fewest experts that together received `share` of the routed tokens.

  An MoE whose gate has collapsed onto a few experts (e.g. top-k gating
  without noise: an expert outside every token's top k gets no gradient,
  eqs. 3 and 6, and is never chosen again) shows it here and in the count
  of unused experts, where CV(load) alone is hard to read.

  Args:
    token_counts: [num_experts] tokens routed to each expert.
    share: a fraction in (0, 1].

  Returns:
    int in [0, num_experts]; 0 when no token was routed.

  Raises:
    ValueError: `share` outside (0, 1] or a negative count.
  """
  if not 0.0 < share <= 1.0:
    raise ValueError(f"share must be in (0, 1], got {share}")
  counts = np.asarray(token_counts, np.float64)
  if (counts < 0).any():
    raise ValueError("token_counts must be non-negative")
  total = counts.sum()
  if total <= 0:
    return 0
  cumulative = np.cumsum(np.sort(counts)[::-1])
  # Tolerance for the float sum: a share met exactly counts as met.
  return int(np.searchsorted(cumulative, share * total * (1 - 1e-12)) + 1)


def collect_expert_stats(model, dataset, max_batches=None, training=False):
  """Runs every MoE layer of `model` over `dataset` and summarizes routing.

  Args:
    model: a functional keras.Model containing MoE layers; on a mesh, the
      inner model (`moe_keras.distribution.Distribution.unwrap`), which runs
      the whole batch while its MoE layers keep their experts on the mesh's
      devices.
    dataset: iterable of (x, ...) batches in the model's input format.
    max_batches: stop after this many batches (None: all).
    training: use the training-time gates (noise, smooth load).

  Returns:
    {layer_name: dict} with per-expert lists 'importance', 'load',
    'token_counts' (summed over the split), 'cv_importance', 'cv_load',
    'max_over_mean_load' over those sums, the same three averaged over
    batches ('batch_mean_cv_importance', ...), 'unused_experts' (experts
    that received no token in the whole split), 'experts_for_90pct_load'
    (`experts_for_load_share`), 'dropped_fraction', and 'num_batches'.
    Empty when the model has no MoE layer.
  """
  layers = moe_layers(model)
  if not layers:
    return {}
  probe, slots = probe_model(model, layers)
  sums = {layer.name: {key: 0.0 for key in STAT_KEYS} for layer in layers}
  batch_stats = {layer.name: [] for layer in layers}
  dropped = {layer.name: [0.0, 0.0] for layer in layers}
  num_batches = 0
  for batch in dataset:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    x = keras.tree.map_structure(np.asarray, x)  # tf.data -> any backend
    probed = probe(x)
    for layer, (input_index, mask_index) in zip(layers, slots):
      stats = layer(
          probed[input_index],
          mask=None if mask_index is None else probed[mask_index],
          training=training,
          return_stats=True,
      )[1]
      if training:
        layer._clear_losses()  # pylint: disable=protected-access
      arrays = {
          key: keras.ops.convert_to_numpy(stats[key]).astype(np.float64)
          for key in STAT_KEYS
      }
      for key in STAT_KEYS:
        sums[layer.name][key] = sums[layer.name][key] + arrays[key]
      batch_stats[layer.name].append(
          (
              _cv(arrays["importance"]),
              _cv(arrays["load"]),
              _max_over_mean(arrays["load"]),
          )
      )
      routed = float(arrays["token_counts"].sum())
      frac = float(keras.ops.convert_to_numpy(stats["dropped_fraction"]))
      dropped[layer.name][0] += frac * routed
      dropped[layer.name][1] += routed
    num_batches += 1
    if max_batches is not None and num_batches >= max_batches:
      break
  results = {}
  for layer in layers:
    s = sums[layer.name]
    per_batch = np.asarray(batch_stats[layer.name] or [(0.0, 0.0, 0.0)])
    counts = np.broadcast_to(
        np.asarray(s["token_counts"], np.float64), (layer.num_experts,)
    )
    results[layer.name] = {
        "num_experts": layer.num_experts,
        "importance": np.asarray(s["importance"]).tolist(),
        "load": np.asarray(s["load"]).tolist(),
        "token_counts": np.asarray(s["token_counts"]).tolist(),
        "cv_importance": _cv(s["importance"]),
        "cv_load": _cv(s["load"]),
        "max_over_mean_load": _max_over_mean(s["load"]),
        "batch_mean_cv_importance": float(per_batch[:, 0].mean()),
        "batch_mean_cv_load": float(per_batch[:, 1].mean()),
        "batch_mean_max_over_mean_load": float(per_batch[:, 2].mean()),
        "unused_experts": int(np.sum(counts == 0)),
        "experts_for_90pct_load": experts_for_load_share(counts),
        "dropped_fraction": (
            dropped[layer.name][0] / max(dropped[layer.name][1], 1.0)
        ),
        "num_batches": num_batches,
        "training_mode": bool(training),
    }
  return results


def plot_expert_stats(stats, output_dir, prefix="experts"):
  """Writes one PNG per MoE layer: per-expert importance and load bars.

  Args:
    stats: the dict of `collect_expert_stats`.
    output_dir: directory for the PNG files.
    prefix: file name prefix; files are `<prefix>_<layer>.png`.

  Returns:
    list of written paths.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for name, layer_stats in stats.items():
    fig = expert_figure(name, layer_stats)
    path = os.path.join(output_dir, f"{prefix}_{name}.png")
    atomic_file.write_atomic(
        path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=PLOT_DPI)
    )
    plt.close(fig)
    paths.append(path)
  return paths


PLOT_DPI = 100
# Horizontal pixels per expert: wide bars for a few experts, at least a
# 2-pixel bar and a 1-pixel gap for thousands (the PNG grows with them).
MAX_PIXELS_PER_EXPERT = 60
MIN_PIXELS_PER_EXPERT = 3
BAR_WIDTH = 2.0 / 3.0


def expert_figure(name, layer_stats):
  """The figure of one layer: importance and load bars, one per expert.

  Args:
    name: the layer's name (titles).
    layer_stats: one layer's dict of `collect_expert_stats`.

  Returns:
    A matplotlib Figure: integer expert ticks, a visible gap between bars
    for 4 to 4096+ experts.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  importance = np.asarray(layer_stats["importance"])
  load = np.asarray(layer_stats["load"])
  n = importance.shape[0]
  per_expert = min(
      MAX_PIXELS_PER_EXPERT, max(MIN_PIXELS_PER_EXPERT, 1200 // max(n, 1))
  )
  width_inches = max(6.0, (n * per_expert + 200) / PLOT_DPI)
  fig, axes = plt.subplots(2, 1, figsize=(width_inches, 6))
  for ax, values, label, cv in (
      (axes[0], importance, "importance (sum of gates)", "cv_importance"),
      (axes[1], load, "load (tokens routed)", "cv_load"),
  ):
    mean = values.mean() if n else 0.0
    ax.bar(
        np.arange(n),
        values,
        width=BAR_WIDTH,
        color="tab:blue",
        linewidth=0,
        antialiased=n <= 256,
    )
    ax.axhline(mean, color="tab:red", linewidth=1, label="mean")
    ax.set_xlim(-0.5, n - 0.5)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel(label)
    ax.set_title(f"{name}: {label}, CV={layer_stats[cv]:.3f}")
    ax.legend(loc="upper right")
  axes[1].set_xlabel(
      f"expert (max/mean load = {layer_stats['max_over_mean_load']:.2f})"
  )
  fig.tight_layout()
  return fig
