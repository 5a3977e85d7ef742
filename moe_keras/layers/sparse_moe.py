"""`SparseMoE`: the Sparsely-Gated Mixture-of-Experts layer (Shazeer et al. 2017).

y = sum_i G(x)_i E_i(x) (eq. 1) with the gates of section 2 / appendix F and the
balancing losses of section 4 / appendix A. Which function implements which
equation is listed in `moe_keras.layers.gating`; the sparse evaluation of eq. (1)
is `moe_keras.layers.dispatch`.

The sigmoid, dropout and residual that the paper's models put around the MoE
belong to the model builders, not to this layer.
"""

import math
import random

import keras
import numpy as np
from keras import ops
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.utils import jax_utils

from moe_keras.layers import backend_ops
from moe_keras.layers import dispatch
from moe_keras.layers import expert_placement
from moe_keras.layers import gating as gating_lib
from moe_keras.layers import small_batch
from moe_keras.layers import variable_groups

GATINGS = ("noisy_top_k", "top_k", "softmax", "batchwise")
# Int seeds drawn for an unseeded initializer traced by jax.jit (as
# keras.random.make_default_seed draws them).
MAX_INT_SEED = 10**9
# Over which batch CV(Importance)^2 and CV(Load)^2 are computed under data
# parallelism (`MoEBase`, "Balancing losses under data parallelism").
BALANCE_OVER = ("replica", "global")
# Layouts of the expert weights (`expert_variables`): one [n, ...] variable
# per weight, or n variables of one expert each. Checkpoints hold the
# stacked [n, ...] arrays under both.
EXPERT_VARIABLES = ("auto", "stacked", "per_expert")
# "auto" gives experts their own variables from this many elements per
# expert kernel (d * h) on: measured on a 2-core CPU, per-expert variables
# made the step 1.4x faster at d=512, h=1024 (524288) and the PTB MoE-256
# training step 5% slower at d=128, h=256 (32768; per-variable optimizer
# work outweighs the saved copy); BUILD.md issue 15, "Stop 52".
PER_EXPERT_MIN_KERNEL_SIZE = 2**18
# The expert weights, stacked [n, ...] (bias names only with use_bias).
EXPERT_WEIGHT_NAMES = (
    "expert_kernel_1",
    "expert_kernel_2",
    "expert_bias_1",
    "expert_bias_2",
)

# id(variable) -> (variable, the list of parts it belongs to, its index) for
# every per-expert part (`expert_variables="per_expert"`), keyed by the
# keras.Variable and by the backend variable inside it (`expert_part_of`).
_EXPERT_PARTS = {}


def expert_part_of(variable):
  """(parts, index) of a per-expert variable, or None.

  Optimizers that save their state in the stacked layout
  (moe_keras.distribution.optimizer) stack the slots of `parts` in order.

  Args:
    variable: a keras.Variable or the backend variable inside one.

  Returns:
    (list of the n part variables of one expert weight, i) for part i, or
    None for any other variable.
  """
  entry = _EXPERT_PARTS.get(id(variable))
  if entry is None or entry[0] is not variable:
    return None
  return entry[1:]


STAT_METRICS = (
    "cv_importance",
    "cv_load",
    "max_over_mean_load",
    "dropped_fraction",
)


class _AuxLossRecords:
  """(added loss, {name: part}) pairs of a layer's calls (not tracked)."""

  def __init__(self):
    self.items = []


@keras.saving.register_keras_serializable(package="moe_keras")
class ExpertKernelInitializer(keras.initializers.Initializer):
  """Variance scaling per expert for stacked [n, fan_in, fan_out] kernels.

  Keras's built-in initializers treat a leading axis as a receptive field and
  would shrink every expert's weights by n; this one scales each expert's
  [fan_in, fan_out] slice as `VarianceScaling(scale, mode, "uniform")` would
  scale a single dense kernel.
  """

  def __init__(self, scale=1.0, mode="fan_avg", seed=None):
    if mode not in ("fan_in", "fan_out", "fan_avg"):
      raise ValueError(
          f"unknown mode {mode!r}; expected fan_in|fan_out|fan_avg"
      )
    self.scale = scale
    self.mode = mode
    self.seed = seed

  def __call__(self, shape, dtype=None):
    fan_in, fan_out = shape[-2], shape[-1]
    fan = {
        "fan_in": fan_in,
        "fan_out": fan_out,
        "fan_avg": (fan_in + fan_out) / 2.0,
    }[self.mode]
    limit = math.sqrt(3.0 * self.scale / max(1.0, fan))
    seed = self.seed
    if seed is None and jax_utils.is_in_jax_tracing_scope():
      # Keras initializes a large sharded variable inside jax.jit (JAX
      # backend: size x mesh devices >= 250 MB), where the global seed
      # generator is refused; draw an int seed from Python's generator
      # (seeded by keras.utils.set_random_seed), as Keras's own random
      # initializers do, one per call.
      seed = random.randint(1, MAX_INT_SEED)
    return keras.random.uniform(
        shape, minval=-limit, maxval=limit, dtype=dtype, seed=seed
    )

  def get_config(self):
    return {"scale": self.scale, "mode": self.mode, "seed": self.seed}


def _validate_common(
    num_experts,
    k,
    capacity_factor,
    w_importance,
    w_load,
    k_name="k",
    experts_name="num_experts",
):
  """Raises ValueError with a one-line cause for bad constructor arguments."""
  if not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f"{experts_name} must be an int >= 1, got {num_experts!r}")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"{k_name} must be an int >= 1, got {k!r}")
  if k > num_experts:
    raise ValueError(
        f"{k_name}={k} is larger than {experts_name}={num_experts}"
    )
  if capacity_factor is not None and not capacity_factor > 0:
    raise ValueError(
        f"capacity_factor must be None (dropless) or > 0, got"
        f" {capacity_factor!r}"
    )
  for name, value in (("w_importance", w_importance), ("w_load", w_load)):
    if value < 0:
      raise ValueError(f"{name} must be >= 0, got {value!r}")


def flatten_tokens(layer_name, inputs, mask):
  """[..., d] inputs and an optional [...] mask -> [N, d] tokens, [N] valid.

  Args:
    layer_name: for error messages.
    inputs: tensor of rank >= 2.
    mask: None or bool tensor of shape inputs.shape[:-1].

  Returns:
    (tokens [N, d], valid bool [N] or None, leading shape).

  Raises:
    ValueError: rank < 2 or a mask whose shape does not match.
  """
  rank = len(inputs.shape)
  if rank < 2:
    raise ValueError(
        f"{layer_name}: inputs must have rank >= 2 ([..., d]), got shape"
        f" {tuple(inputs.shape)}"
    )
  leading = ops.shape(inputs)[:-1]
  tokens = ops.reshape(inputs, (-1, inputs.shape[-1]))
  if mask is None:
    return tokens, None, leading
  if len(mask.shape) != rank - 1 or any(
      m is not None and i is not None and m != i
      for m, i in zip(mask.shape, inputs.shape[:-1])
  ):
    raise ValueError(
        f"{layer_name}: mask shape {tuple(mask.shape)} does not match inputs"
        f" shape {tuple(inputs.shape)} without the last axis"
    )
  return tokens, ops.reshape(ops.cast(mask, "bool"), (-1,)), leading


class MoEBase(keras.layers.Layer):
  """Shared machinery of SparseMoE and HierarchicalSparseMoE.

  Holds the stacked experts, the losses/statistics plumbing and the Keras
  metrics. Subclasses implement `_route`.

  Dispatch (`dispatch_mode`, dropless only; see moe_keras.layers.dispatch):
    "grouped" (default): one matmul pair per expert over exactly its rows
      (JAX: on CPUs the loop over groups of `tiled_grouped_matmul`, on
      GPUs the Pallas kernels of `pallas_grouped_matmul`, else
      `jax.lax.ragged_dot`; `backend_ops.jax_grouped_matmul_choice`).
    "padded": TensorFlow only (JAX keeps "grouped"): one batched einsum
      over [n, C, d], C = this step's largest expert count rounded up; same
      values, nothing dropped. Slower than "grouped" in the PTB training
      step on a 2-core CPU (measured); an option for accelerators.
  On TensorFlow the dropless layouts' shapes depend on the routing, which
  XLA cannot compile: such a layer sets `supports_jit = False`, so Keras
  trains it without XLA (`jit_compile`); capacity mode keeps XLA.

  Memory options (appendix D; both default off):
    recompute_expert_activations: the [tokens*k, h] ReLU activations of the
      experts are not kept between the forward and the backward pass; the
      gradient recomputes them from the dispatched rows (same values and
      gradients, one more expert matmul per step).
    expert_dtype: None (experts follow the layer's dtype policy) or a dtype
      policy name for the experts only: "bfloat16" (bf16 expert weights and
      activations) or "mixed_bfloat16" (float32 weights, bf16 compute). The
      gating (W_g, W_noise, logits, softmax, Phi, Load, losses) stays
      float32 and the output is in the layer's compute dtype.

  Expert weight layout (`expert_variables`):
    "auto" (default): "per_expert" where it is the fast layout (TensorFlow,
      dropless, "grouped" dispatch, no tf.distribute strategy, experts not
      sharded by a placement, expert kernels of at least
      PER_EXPERT_MIN_KERNEL_SIZE elements), else "stacked". `expert_parts`
      says which the built layer has.
    "stacked": `expert_kernel_1` [n, d, h], `expert_kernel_2`
      [n, h, d_out] (and biases [n, h], [n, d_out]) are one variable each.
    "per_expert": n variables per weight, `expert_kernel_1_{i}` [d, h] and
      so on (`expert_parts`). On TensorFlow's dropless "grouped" dispatch
      each expert's weight gradient is then its own tensor; stacked, the
      step writes the n gradient pieces into one [n, d, h] buffer, which on
      a CPU costs about as much as the experts' own matmuls at 32 tokens
      per expert (benchmarks/moe_layer.py --expert_variables). Other paths
      (capacity mode, padded dispatch, JAX, small-batch decoding) stack the
      parts each step (a copy of the weights). Same values and gradients;
      checkpoints hold the stacked [n, ...] arrays under both layouts, so
      a checkpoint's weights load into either; so does the optimizer state
      of an optimizer wrapped by `moe_keras.distribution.optimizer.
      colocate_slots` (every experiment's), which saves per-expert slots
      stacked. One device only (explicit "per_expert" is refused with
      `expert_devices` or a placement that shards the experts; "auto" is
      stacked or sharded there).

  Balancing losses under data parallelism (`balance_over`):
    "replica" (default): every data-parallel replica computes
      CV(Importance)^2 and CV(Load)^2 (eqs. 6-7, 10-11; appendix B: 13-14)
      over its own slice of the batch, and the step's loss is the mean of
      the replicas' values (TensorFlow: in-graph mesh replicas and
      tf.distribute replicas).
    "global": the replicas' Importance and Load sums are added up before
      CV^2 (appendix B: the sums Load_primary, Load_i(X^(i)) and |X^(i)|
      that eq. 14 combines), so the loss is the one a single device computes
      on the global batch, and so is its gradient. Where the step is one
      program over the global batch (one device; JAX under a
      keras.distribution, SPMD) both options give that loss. The sums are
      added by the installed expert placement (moe_keras.layers.
      expert_placement): `moe_keras.distribution` adds them over the in-graph
      mesh replicas and all-reduces them across tf.distribute replicas
      (e.g. the hosts of MultiWorkerMirroredStrategy). The statistics
      (`return_stats`, metrics) describe each call's own tokens under both.
      L_batchwise (eq. 20) and the batchwise gating's per-batch capacity
      (eq. 18) stay per replica.
  """

  def __init__(
      self,
      num_experts,
      expert_hidden_dim,
      output_dim=None,
      w_importance=0.1,
      w_load=0.1,
      capacity_factor=None,
      use_bias=False,
      noise_epsilon=gating_lib.DEFAULT_NOISE_EPSILON,
      noise_scale=1.0,
      kernel_initializer=None,
      bias_initializer="zeros",
      kernel_regularizer=None,
      seed=None,
      track_metrics=True,
      recompute_expert_activations=False,
      expert_dtype=None,
      expert_devices=None,
      dispatch_mode="grouped",
      balance_over="replica",
      expert_variables="auto",
      **kwargs,
  ):
    super().__init__(**kwargs)
    if (
        not isinstance(expert_variables, str)
        or expert_variables not in EXPERT_VARIABLES
    ):
      raise ValueError(
          f"unknown expert_variables {expert_variables!r}; expected one of"
          f" {', '.join(EXPERT_VARIABLES)}"
      )
    if expert_variables == "per_expert" and expert_devices is not None:
      raise ValueError(
          "expert_variables='per_expert' keeps the experts on one device;"
          " it cannot be combined with expert_devices"
      )
    self.expert_variables = expert_variables
    if dispatch_mode not in dispatch.DISPATCH_MODES:
      raise ValueError(
          f"unknown dispatch_mode {dispatch_mode!r}; expected one of"
          f" {', '.join(dispatch.DISPATCH_MODES)}"
      )
    self.dispatch_mode = dispatch_mode
    if not isinstance(balance_over, str) or balance_over not in BALANCE_OVER:
      raise ValueError(
          f"unknown balance_over {balance_over!r}; expected one of"
          f" {', '.join(BALANCE_OVER)}"
      )
    self.balance_over = balance_over
    if not isinstance(expert_hidden_dim, int) or expert_hidden_dim < 1:
      raise ValueError(
          f"expert_hidden_dim must be an int >= 1, got {expert_hidden_dim!r}"
      )
    if output_dim is not None and (
        not isinstance(output_dim, int) or output_dim < 1
    ):
      raise ValueError(
          f"output_dim must be None or an int >= 1, got {output_dim!r}"
      )
    self.num_experts = num_experts
    self.expert_hidden_dim = expert_hidden_dim
    self.output_dim = output_dim
    self.w_importance = float(w_importance)
    self.w_load = float(w_load)
    self.capacity_factor = (
        None if capacity_factor is None else float(capacity_factor)
    )
    if (
        self.capacity_factor is None
        and backend_ops.backend_name() == "tensorflow"
    ):
      # XLA (Keras's `jit_compile`, on by default for TensorFlow with a GPU)
      # needs static shapes, and the dropless dispatch's depend on the
      # routing on TensorFlow: Keras then compiles without XLA (with a
      # warning if jit_compile=True was asked for) instead of failing.
      self.supports_jit = False
    self.use_bias = bool(use_bias)
    self.noise_epsilon = float(noise_epsilon)
    if (
        isinstance(noise_scale, bool)
        or not isinstance(noise_scale, (int, float))
        or not noise_scale > 0
    ):
      raise ValueError(f"noise_scale must be a number > 0, got {noise_scale!r}")
    self.noise_scale = float(noise_scale)
    self.kernel_initializer = keras.initializers.get(
        kernel_initializer or ExpertKernelInitializer()
    )
    self.bias_initializer = keras.initializers.get(bias_initializer)
    self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.track_metrics = bool(track_metrics)
    self.recompute_expert_activations = bool(recompute_expert_activations)
    # Experts may use their own dtype policy (e.g. "bfloat16": bf16 weights
    # and activations, or "mixed_bfloat16": float32 weights, bf16 compute);
    # gating always computes in float32 (see `_route`).
    self.expert_dtype = (
        None
        if expert_dtype is None
        else keras.dtype_policies.get(expert_dtype).name
    )
    # Placement, not architecture: not in get_config, and checkpoints store
    # the unsharded [n, ...] arrays (see moe_keras.layers.expert_placement).
    self.expert_devices = (
        None if expert_devices is None else list(expert_devices)
    )
    self._expert_shards = None
    # expert_variables="per_expert": {name: [n variables]} (see
    # `expert_parts`); None for the stacked layout.
    self._expert_parts = None
    # Experts per token and largest tokens*k for moe_keras.layers.
    # small_batch (SparseMoE sets them); None: never.
    self._small_batch_k = None
    self._small_batch_limit = 0
    self.supports_masking = True
    self._aux_loss_records = _AuxLossRecords()
    self._stat_trackers = {}
    # Keras metrics owned by a layer are updated inside call(), which a
    # jitted JAX train step runs statelessly: they would stay at 0 there, so
    # they exist on TensorFlow only (JAX callers use return_stats=True).
    if self.track_metrics and keras.backend.backend() == "tensorflow":
      for stat in STAT_METRICS:
        self._stat_trackers[stat] = keras.metrics.Mean(
            name=f"{self.name}_{stat}"
        )

  # -- variables ------------------------------------------------------------

  @property
  def expert_compute_dtype(self):
    """Dtype of the expert matmuls and of the dispatched rows."""
    if self.expert_dtype is None:
      return self.compute_dtype
    return keras.dtype_policies.get(self.expert_dtype).compute_dtype

  def _expert_weight_kwargs(self):
    if self.expert_dtype is None:
      return {}
    policy = keras.dtype_policies.get(self.expert_dtype)
    return {"dtype": policy.variable_dtype, "autocast": False}

  def _build_experts(self, input_dim):
    # Placement hook (moe_keras.layers.expert_placement): an installed
    # placement may create the experts elsewhere (e.g. blocks on devices).
    shards = expert_placement.current().build_experts(self, input_dim)
    if shards is not None:
      if self.expert_variables == "per_expert":
        raise ValueError(
            f"{self.name}: expert_variables='per_expert' keeps the experts"
            " on one device, but the installed expert placement shards them"
        )
      self._expert_shards = shards
      return
    out_dim = self.output_dim or input_dim
    n, h = self.num_experts, self.expert_hidden_dim
    specs = [
        ("expert_kernel_1", (n, input_dim, h), self.kernel_initializer),
        ("expert_kernel_2", (n, h, out_dim), self.kernel_initializer),
    ]
    if self.use_bias:
      specs += [
          ("expert_bias_1", (n, h), self.bias_initializer),
          ("expert_bias_2", (n, out_dim), self.bias_initializer),
      ]
    self.expert_bias_1 = None
    self.expert_bias_2 = None
    if self._per_expert_layout(input_dim * h):
      self._expert_parts = {}
    for name, shape, initializer in specs:
      regularizer = (
          self.kernel_regularizer if name.startswith("expert_kernel") else None
      )
      if self._expert_parts is None:
        setattr(
            self,
            name,
            self.add_weight(
                name=name,
                shape=shape,
                initializer=initializer,
                regularizer=regularizer,
                **self._expert_weight_kwargs(),
            ),
        )
      else:
        setattr(self, name, None)
        self._expert_parts[name] = self._add_expert_parts(
            name, shape, initializer, regularizer
        )

  def _per_expert_layout(self, kernel_size):
    """Whether the experts (on this device) get one variable each.

    Args:
      kernel_size: d * h, elements of one expert's first kernel.

    Returns:
      python bool: `expert_variables` resolved ("auto": TensorFlow, dropless
      "grouped" dispatch, outside any tf.distribute strategy, kernels of at
      least PER_EXPERT_MIN_KERNEL_SIZE elements: where the per-expert
      weight gradients save writing the [n, d, h] ones).
    """
    if self.expert_variables != "auto":
      return self.expert_variables == "per_expert"
    if backend_ops.backend_name() != "tensorflow":
      return False
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return (
        self.capacity_factor is None
        and self.dispatch_mode == "grouped"
        and kernel_size >= PER_EXPERT_MIN_KERNEL_SIZE
        and not tf.distribute.has_strategy()
    )

  def _add_expert_parts(self, name, shape, initializer, regularizer):
    """expert_variables="per_expert": n variables `{name}_{i}` = shape[1:].

    The initial values are slices of one stacked draw of `initializer` on
    the whole [n, ...] shape, so both layouts start from the same
    distribution (and, for a seeded initializer, the same values).

    Returns:
      list of n variables.
    """
    extra = self._expert_weight_kwargs()
    full = initializer(shape, dtype=extra.get("dtype", self.variable_dtype))
    parts = []
    for i in range(shape[0]):
      parts.append(
          self.add_weight(
              name=f"{name}_{i}",
              shape=shape[1:],
              initializer=lambda shape, dtype=None, i=i: full[i],
              regularizer=regularizer,
              **extra,
          )
      )
    for i, var in enumerate(parts):
      _EXPERT_PARTS[id(var)] = (var, parts, i)
      _EXPERT_PARTS[id(var.value)] = (var.value, parts, i)
    return parts

  @property
  def expert_parts(self):
    """expert_variables="per_expert": {name: list of n variables}, else None.

    Names are EXPERT_WEIGHT_NAMES present in the layer (biases only with
    use_bias); part i of "expert_kernel_1" is expert i's [d, h] kernel.
    """
    return self._expert_parts

  def set_expert_weight(self, name, value):
    """Assigns the stacked value [n, ...] of expert weight `name`, any layout.

    Args:
      name: one of EXPERT_WEIGHT_NAMES present in the layer.
      value: array-like of the stacked shape.

    Raises:
      ValueError: the layer has no such weight, its experts are sharded
        (assign through a checkpoint), or `value` has another shape.
    """
    if self._expert_shards is not None:
      raise ValueError(
          f"{self.name}: its experts are sharded; load their values from a"
          " checkpoint"
      )
    if name not in EXPERT_WEIGHT_NAMES:
      entry = None
    elif self._expert_parts is None:
      entry = getattr(self, name)
    else:
      entry = self._expert_parts.get(name)
    if entry is None:
      raise ValueError(f"{self.name} has no expert weight {name!r}")
    if isinstance(entry, list):
      entry = variable_groups.Entry(variable_groups.STACK, entry)
    else:
      entry = variable_groups.Entry(variable_groups.ONE, [entry])
    value = np.asarray(value)
    if value.shape != variable_groups.entry_shape(entry):
      raise ValueError(
          f"{self.name}: {name} has shape"
          f" {variable_groups.entry_shape(entry)}, got {value.shape}"
      )
    variable_groups.assign_entry(entry, value)

  def expert_weight(self, name):
    """Stacked expert weight `name` of either layout ([n, ...]) or None.

    Args:
      name: one of EXPERT_WEIGHT_NAMES.

    Returns:
      The variable (stacked layout), a stacked tensor of the parts
      ("per_expert": a copy, differentiable), or None (an absent bias).
    """
    if self._expert_parts is None:
      return getattr(self, name)
    parts = self._expert_parts.get(name)
    if parts is None:
      return None
    return ops.stack([v.value for v in parts], axis=0)

  def _gate_weight(self, name, shape):
    """Zero-initialized float32 gating variable (paper: W_g = W_noise = 0)."""
    return self.add_weight(
        name=name,
        shape=shape,
        initializer="zeros",
        dtype="float32",
        autocast=False,
    )

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

  def compute_mask(self, inputs, mask=None):
    return mask

  # -- forward --------------------------------------------------------------

  def call(
      self, inputs, training=None, mask=None, return_stats=False, noise=None
  ):
    """Applies the MoE to every position of `inputs`.

    Args:
      inputs: [..., d], any rank >= 2; [batch, time, d] is routed as
        batch*time independent tokens (the paper's convolutional use).
      training: bool; noise (noisy_top_k) and losses only when True.
      mask: optional bool [...] (Keras mask); False tokens are not routed,
        output zeros and count in no loss or statistic.
      return_stats: also return the per-step statistics dict.
      noise: optional standard-normal draws replacing the random noise of
        eq. (4) in training (see the subclass for the shape).

    Returns:
      [..., d_out] in the layer's compute dtype, and with `return_stats` a
      dict of float32 tensors: importance [n], load [n], token_counts [n],
      cv_importance, cv_load, max_over_mean_load, dropped_fraction,
      importance_loss, load_loss, plus subclass-specific entries.
    """
    training = bool(training)
    tokens, valid, leading = flatten_tokens(self.name, inputs, mask)
    tokens = ops.cast(tokens, self.compute_dtype)
    routing = self._route(tokens, valid, training, noise)
    combined, plan = self._combined_output(tokens, routing, training)
    outputs = ops.reshape(
        ops.cast(combined, self.compute_dtype),
        tuple(leading) + (combined.shape[-1],),
    )

    stats = self._statistics(routing, plan, training)
    if training:
      self._add_training_losses(routing, stats)
    if not in_stateless_scope():
      for name, tracker in self._stat_trackers.items():
        tracker.update_state(stats[name])
    if return_stats:
      return outputs, stats
    return outputs

  def _combined_output(self, tokens, routing, training):
    """Eq. (1) for the routed tokens: the routing plan, or small_batch.

    Returns:
      ([N, d_out] float32 combined output, an object with `token_counts`
      [n] and `num_dropped` for the statistics: the RoutingPlan, or
      small_batch.StepCounts when the step is small; see
      moe_keras.layers.small_batch).
    """
    gates = routing["gates"]
    ids = routing["expert_ids"]
    rows_in = ops.cast(tokens, self.expert_compute_dtype)

    def planned():
      plan_ids, plan_gates = ids, gates
      if self._compact_plan_slots():
        plan_ids, plan_gates = dispatch.compact_slots(
            ids, gates, self.num_experts
        )
      plan = dispatch.RoutingPlan(
          plan_ids,
          num_experts=self.num_experts,
          capacity_factor=self.capacity_factor,
          padded=self._padded_dispatch(),
      )
      expert_out = self._run_experts(plan, plan.dispatch(rows_in))
      return plan.combine(expert_out, plan_gates), plan

    small = (
        self._small_batch_k is not None
        and self.capacity_factor is None
        and self._expert_shards is None
        and small_batch.use_small_batch(
            ids.shape[0] if ids.shape[0] is not None else ops.shape(ids)[0],
            self._small_batch_k,
            self._small_batch_limit,
            training,
        )
    )
    if small is False:
      return planned()

    def gathered():
      cast = lambda v: (
          None if v is None else ops.cast(v, self.expert_compute_dtype)
      )
      out = small_batch.moe_output(
          rows_in,
          ids,
          gates,
          *[cast(self.expert_weight(name)) for name in EXPERT_WEIGHT_NAMES],
          slots_are_experts=self._slots_are_experts(),
      )
      return out, small_batch.StepCounts(
          small_batch.token_counts(ids, self.num_experts),
          ops.zeros((), "int32"),
      )

    if small is True:
      return gathered()

    # Dynamic batch at inference (decoding): chosen per step. Both branches
    # return (output, token counts): cond cannot return the plan object.
    def output_and_counts(branch):
      out, counts = branch()
      return out, counts.token_counts

    out, counts = ops.cond(
        small,
        lambda: output_and_counts(gathered),
        lambda: output_and_counts(planned),
    )
    return out, small_batch.StepCounts(counts, ops.zeros((), "int32"))

  @property
  def aux_loss_names(self):
    """Names (gating.AUX_LOSS_NAMES) of the losses it adds in training."""
    return (gating_lib.IMPORTANCE_LOSS, gating_lib.LOAD_LOSS)

  def add_aux_losses(self, parts):
    """`add_loss` of the sum of `parts`, remembered by name for the logs.

    One loss is added per call, as before; `aux_loss_parts` lets a model
    (`moe_keras.models.task_model`) find that tensor among `model.losses`
    and log each part under its own name. The installed expert placement
    scales every part (e.g. divides it by the in-graph replicas).

    Args:
      parts: dict {name from `aux_loss_names`: float32 scalar tensor}.
    """
    parts = {
        name: expert_placement.current().scale_loss(value)
        for name, value in parts.items()
    }
    total = None
    for value in parts.values():
      total = value if total is None else total + value
    self.add_loss(total)
    # Keep the records of the losses Keras still holds for this layer (those
    # of the current model call); older ones are gone from `losses`.
    current = self._get_own_losses()
    records = self._aux_loss_records
    records.items = [
        record
        for record in records.items
        if any(record[0] is loss for loss in current)
    ] + [(total, parts)]

  def aux_loss_parts(self):
    """[(loss added by `add_aux_losses`, {name: part})], latest calls."""
    return list(self._aux_loss_records.items)

  # -- balancing losses (eqs. 6-7, 10-11; appendix B: 13-14) ----------------

  def _balance_sums(self, routing):
    """The sums over this call's tokens that the balancing losses read.

    Every entry is a sum over tokens, so the sums of a batch cut into
    slices are the slices' sums added up (what balance_over="global" adds
    across the data-parallel replicas).

    Args:
      routing: the dict `_route` returns.

    Returns:
      dict {"importance": float32 [n] (eq. 6), "load": float32 [n] (eq. 10,
      only when the load is smooth: noisy top-k in training)}.
    """
    sums = {"importance": routing["importance"]}
    if routing.get("load_is_smooth"):
      sums["load"] = routing["load"]
    return sums

  def _balance_vectors(self, sums):
    """(Importance [n], Load [n] or None) from `_balance_sums`' entries."""
    return sums["importance"], sums.get("load")

  def balancing_losses(self, sums):
    """w_importance CV(Importance)^2 and w_load CV(Load)^2, eqs. (7), (11).

    Args:
      sums: dict from `_balance_sums`: one call's, or the sums of a step's
        data-parallel replicas added up (balance_over="global").

    Returns:
      dict {gating.IMPORTANCE_LOSS: float32 scalar, gating.LOAD_LOSS:
      float32 scalar (only with a smooth load)}. CV^2 = population
      variance / (mean^2 + CV_EPSILON) (`gating.cv_squared`).
    """
    importance, load = self._balance_vectors(sums)
    losses = {
        gating_lib.IMPORTANCE_LOSS: (
            self.w_importance * gating_lib.cv_squared(importance)
        )
    }
    if load is not None:
      losses[gating_lib.LOAD_LOSS] = self.w_load * gating_lib.cv_squared(load)
    return losses

  def _add_training_losses(self, routing, stats):
    """Adds this call's training losses (one `add_aux_losses`).

    balance_over="replica": the balancing losses of this call's tokens
    (`stats`). "global": the installed expert placement returns the sums of
    the global batch (then their losses are added here), or keeps this
    call's sums and later calls `add_global_balancing_losses` once for all
    replicas (the in-graph mesh). Losses of `routing["extra_losses"]`
    (L_batchwise) are this call's under both.

    Args:
      routing: the dict `_route` returns.
      stats: the dict `_statistics` returns (training).
    """
    parts = {}
    if self.balance_over == "replica":
      parts[gating_lib.IMPORTANCE_LOSS] = stats["importance_loss"]
      parts[gating_lib.LOAD_LOSS] = stats["load_loss"]
    else:
      sums = expert_placement.current().global_balance_sums(
          self, self._balance_sums(routing)
      )
      if sums is not None:
        parts.update(self.balancing_losses(sums))
    parts.update(routing.get("extra_losses", {}))
    parts = {name: parts[name] for name in self.aux_loss_names if name in parts}
    if parts:
      self.add_aux_losses(parts)

  def add_global_balancing_losses(self, sums):
    """Adds the balancing losses of a step's global batch (one add_loss).

    For expert placements that collect the `_balance_sums` of one call of
    this layer in every data-parallel replica (balance_over="global") and
    add them up; the losses are then those of one device on the global
    batch.

    Args:
      sums: dict like `_balance_sums`' (float32 tensors), summed over the
        replicas.
    """
    losses = self.balancing_losses(sums)
    self.add_aux_losses(
        {name: losses[name] for name in self.aux_loss_names if name in losses}
    )

  def _slots_are_experts(self):
    """Whether slot i of every token is expert i or unrouted (K = n)."""
    return getattr(self, "gating", None) == "batchwise"

  def _compact_plan_slots(self):
    """Whether the plan gets only the routed slots (`compact_slots`).

    Gatings that mark most of their [N, K] slots unrouted (batchwise: K = n,
    about k routed per token) would make the dropless plan sort, gather and
    combine N*n slots; compacted, N*K' (K' = the most any token routes).
    Dropless, experts on one device, TensorFlow (dynamic K') only.

    Returns:
      python bool.
    """
    return (
        self._slots_are_experts()
        and self.capacity_factor is None
        and self._expert_shards is None
        and backend_ops.backend_name() == "tensorflow"
    )

  def _padded_dispatch(self):
    """Whether the dropless plan uses the padded layout (dispatch_mode).

    Returns:
      python bool: "padded" on TensorFlow for experts on one device (JAX
      keeps its grouped kernel; sharded experts dispatch per device block).
    """
    return (
        self.dispatch_mode == "padded"
        and self._expert_shards is None
        and backend_ops.backend_name() == "tensorflow"
    )

  def _run_experts(self, plan, rows):
    """Runs the experts on the dispatched rows ([R, d] -> [R, d_out])."""
    if self._expert_shards is not None:
      return self._expert_shards.run(plan, rows)
    expert_dtype = self.expert_compute_dtype
    cast = lambda v: None if v is None else ops.cast(v, expert_dtype)
    # Per-expert variables go to TensorFlow's grouped FFN as lists: each
    # expert's weight gradient stays its own tensor (see `expert_variables`).
    as_lists = (
        self._expert_parts is not None
        and plan.capacity is None
        and backend_ops.backend_name() == "tensorflow"
    )

    def weight(name):
      if not as_lists:
        return cast(self.expert_weight(name))
      parts = self._expert_parts.get(name)
      return None if parts is None else [cast(v) for v in parts]

    return dispatch.expert_ffn(
        plan,
        rows,
        *[weight(name) for name in EXPERT_WEIGHT_NAMES],
        recompute=self.recompute_expert_activations,
    )

  def save_own_variables(self, store):
    """Saves as the unsharded layer would ([n, ...] arrays), any layout."""
    if self._expert_shards is not None:
      self._expert_shards.save_own_variables(store)
    elif self._expert_parts is not None:
      variable_groups.save(self._checkpoint_entries(), store)
    else:
      super().save_own_variables(store)

  def load_own_variables(self, store):
    """Loads unsharded [n, ...] arrays into any layout.

    Raises:
      ValueError: the store's variables do not fit this layer's.
    """
    if self._expert_shards is not None:
      self._expert_shards.load_own_variables(store)
    elif self._expert_parts is not None:
      variable_groups.load(self._checkpoint_entries(), store, self.name)
    else:
      super().load_own_variables(store)

  def _checkpoint_entries(self):
    """Own variables in the stacked layout's order; parts as one entry."""

    def group_of(var):
      found = expert_part_of(var)
      return None if found is None else (variable_groups.STACK, found[0])

    # pylint: disable=protected-access
    owned = self._trainable_variables + self._non_trainable_variables
    # pylint: enable=protected-access
    return variable_groups.entries(owned, group_of)

  def _statistics(self, routing, plan, training):
    """Per-step statistics and the weighted balancing losses (eqs. 6-11).

    All over this call's tokens, whatever `balance_over` says. The losses
    are zero outside training (they are added only in training).
    """
    counts = ops.cast(plan.token_counts, "float32")
    importance_vec = routing["importance"]
    load_vec = routing.get("load")
    if load_vec is None:
      load_vec = counts
    routed = ops.sum(counts)
    zero = ops.zeros((), "float32")
    losses = (
        self.balancing_losses(self._balance_sums(routing)) if training else {}
    )
    stats = {
        "importance": importance_vec,
        "load": load_vec,
        "token_counts": counts,
        "cv_importance": gating_lib.coefficient_of_variation(importance_vec),
        "cv_load": gating_lib.coefficient_of_variation(load_vec),
        "max_over_mean_load": (
            ops.max(load_vec) / (ops.mean(load_vec) + gating_lib.CV_EPSILON)
        ),
        "dropped_fraction": (
            ops.cast(plan.num_dropped, "float32") / ops.maximum(routed, 1.0)
        ),
        "importance_loss": losses.get(gating_lib.IMPORTANCE_LOSS, zero),
        "load_loss": losses.get(gating_lib.LOAD_LOSS, zero),
    }
    stats.update(routing.get("extra_stats", {}))
    return stats

  def _noise(self, shape, noise):
    if noise is not None:
      return ops.cast(noise, "float32")
    return gating_lib.standard_normal(shape, seed=self.seed_generator)

  def _route(self, tokens, valid, training, noise):
    raise NotImplementedError

  def get_config(self):
    config = super().get_config()
    config.update(
        {
            "expert_hidden_dim": self.expert_hidden_dim,
            "output_dim": self.output_dim,
            "w_importance": self.w_importance,
            "w_load": self.w_load,
            "capacity_factor": self.capacity_factor,
            "use_bias": self.use_bias,
            "noise_epsilon": self.noise_epsilon,
            "noise_scale": self.noise_scale,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": keras.initializers.serialize(
                self.bias_initializer
            ),
            "kernel_regularizer": keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            "seed": self.seed,
            "track_metrics": self.track_metrics,
            "recompute_expert_activations": self.recompute_expert_activations,
            "expert_dtype": self.expert_dtype,
            "dispatch_mode": self.dispatch_mode,
            "balance_over": self.balance_over,
            "expert_variables": self.expert_variables,
        }
    )
    return config


@keras.saving.register_keras_serializable(package="moe_keras")
class SparseMoE(MoEBase):
  """Sparsely-gated MoE layer: y = sum_i G(x)_i E_i(x), eq. (1).

  Experts are one-hidden-layer ReLU networks E_i(x) = ReLU(x W1_i) W2_i
  (no biases by default, matching the paper's parameter counts;
  `use_bias=True` adds them), stored stacked with a leading experts axis:
  `expert_kernel_1` [n, d, h], `expert_kernel_2` [n, h, d_out]. Gating
  variables `w_gate` [d, n] and, for "noisy_top_k" only, `w_noise` [d, n]
  are zero-initialized and float32 (the other gatings have no noise, so no
  W_noise).

  Gatings (`gating=`):
    "noisy_top_k": eqs. (3)-(5); N(0,1) noise scaled by Softplus(x W_noise)
      (+ noise_epsilon, times noise_scale: 1.0 is the paper, other values
      are an ablation) only in training; losses eqs. (6)-(11).
    "top_k": eqs. (3), (5) without noise; importance loss only (without
      noise the load of eq. 10 has no smooth estimator; the statistic is the
      token count).
    "softmax": the dense gate of eq. (2); every expert runs on every token
      (a baseline, cost proportional to n).
    "batchwise": strictly balanced gating, appendix F, eqs. (15)-(20): in
      training every expert takes exactly m = k|X|/n tokens (eq. 18; ties,
      e.g. at initialization, spread over the experts: see
      `gating.batchwise_mask`); learned per-expert thresholds T (eq. 19,
      initialized to 1/n) trained with L_batchwise (eq. 20 as a mean over
      tokens and experts, weight `w_batchwise`, gradient to T only) select
      experts per example at inference, so decoding one token at a time is
      safe.

  Losses (training only, one add_loss per call; over non-padding tokens):
  w_importance * CV(Importance)^2 + w_load * CV(Load)^2 (+ w_batchwise
  L_batchwise). CV is the population std over the mean. The models of
  `moe_keras.models` log each term under its own name (`aux_loss_names`).
  Under data parallelism, `balance_over` says whether the CV^2 terms are
  each replica's (mean over replicas) or the global batch's (see MoEBase).

  Dispatch is sparse (see `moe_keras.layers.dispatch`): compute grows with
  k * tokens. `capacity_factor=None` is dropless (the paper); a number c
  gives every expert a fixed capacity ceil(c * N * k / n) (static shapes for
  XLA/JAX); overflow assignments are dropped in token order and reported as
  `dropped_fraction`.

  Small steps (tokens*k <= `small_batch_limit`, e.g. one step of decoding;
  None: the backend's default, 0: never) skip the routing plan: each token's
  experts run through per-token gathers and one batched matmul per layer
  (`moe_keras.layers.small_batch`); same values and gradients. Dropless,
  unsharded experts, gatings other than "softmax" only.

  At k = 1 the single kept gate is softmax of one logit = 1.0: the task loss
  gives W_g no gradient, and only the balancing losses train the gate.
  """

  def __init__(
      self,
      num_experts,
      k,
      expert_hidden_dim,
      output_dim=None,
      gating="noisy_top_k",
      w_importance=0.1,
      w_load=0.1,
      capacity_factor=None,
      w_batchwise=1.0,
      small_batch_limit=None,
      **kwargs,
  ):
    if gating not in GATINGS:
      raise ValueError(
          f"unknown gating {gating!r}; expected one of {', '.join(GATINGS)}"
      )
    _validate_common(num_experts, k, capacity_factor, w_importance, w_load)
    if small_batch_limit is not None and (
        not isinstance(small_batch_limit, int) or small_batch_limit < 0
    ):
      raise ValueError(
          "small_batch_limit must be None (the backend's default) or an int"
          f" >= 0 (0: never), got {small_batch_limit!r}"
      )
    super().__init__(
        num_experts=num_experts,
        expert_hidden_dim=expert_hidden_dim,
        output_dim=output_dim,
        w_importance=w_importance,
        w_load=w_load,
        capacity_factor=capacity_factor,
        **kwargs,
    )
    self.k = k
    self.gating = gating
    self.w_batchwise = float(w_batchwise)
    self.small_batch_limit = small_batch_limit
    # The softmax gating routes every token to all n experts: never small.
    self._small_batch_k = None if gating == "softmax" else k
    self._small_batch_limit = (
        small_batch.default_limit(num_experts)
        if small_batch_limit is None
        else small_batch_limit
    )

  def build(self, input_shape):
    input_dim = input_shape[-1]
    if input_dim is None:
      raise ValueError(f"{self.name}: the last input dimension must be known")
    self.w_gate = self._gate_weight("w_gate", (input_dim, self.num_experts))
    if self.gating == "noisy_top_k":
      self.w_noise = self._gate_weight("w_noise", (input_dim, self.num_experts))
    if self.gating == "batchwise":
      # T starts at 1/n, the mean of every gate row (the paper does not give
      # an initial value). T = 0 would admit every expert for every token at
      # inference (all softmax probabilities are > 0); at 1/n a fresh model,
      # whose probabilities all equal 1/n (W_g = 0), admits none: the MoE
      # adds nothing until L_batchwise has fitted T.
      self.thresholds = self.add_weight(
          name="thresholds",
          shape=(self.num_experts,),
          initializer=keras.initializers.Constant(1.0 / self.num_experts),
          dtype="float32",
          autocast=False,
      )
    self._build_experts(input_dim)

  def _route(self, tokens, valid, training, noise):
    """Computes the gates of the configured gating.

    Args:
      tokens: [N, d] compute dtype.
      valid: bool [N] or None.
      training: python bool.
      noise: optional float [N, n] standard normal (noisy_top_k, training).

    Returns:
      dict with expert_ids int32 [N, K] (n = unrouted), gates float32 [N, K],
      importance [n], load [n] or None, load_is_smooth, extra_losses
      ({name: weighted loss}) and extra_stats.
    """
    n = self.num_experts
    x = ops.cast(tokens, "float32")
    valid_f = None if valid is None else ops.cast(valid, "float32")[:, None]
    result = {}
    clean = ops.matmul(x, self.w_gate)  # [N, n]
    if self.gating in ("noisy_top_k", "top_k"):
      smooth_load = None
      if self.gating == "noisy_top_k" and training:
        # x . W_noise as its own matmul: one matmul on [W_g | W_noise] split
        # in two costs more in the backward pass (the gradient of the slices
        # pads each half back to [N, 2n]; measured).
        gates, indices, smooth_load = gating_lib.noisy_top_k_load(
            clean,
            ops.matmul(x, self.w_noise),
            self._noise(ops.shape(clean), noise),
            self.k,
            self.noise_epsilon,
            self.noise_scale,
            valid=None if valid_f is None else valid_f[:, 0],
        )  # eqs. (3)-(5), (8)-(10)
      else:
        # Plain top_k in training: a fresh layer's logits all tie (W_g = 0).
        gates, indices = gating_lib.top_k_gates(
            clean, self.k, rotate_ties=training, valid=valid
        )
      result["load"] = smooth_load
      result["load_is_smooth"] = smooth_load is not None
    elif self.gating == "softmax":
      gates = gating_lib.softmax_gates(clean)
      indices = ops.broadcast_to(
          ops.arange(n, dtype="int32")[None, :], ops.shape(gates)
      )
    else:  # batchwise, appendix F.
      probs = gating_lib.softmax_gates(clean)  # eq. (15)
      thresholds = ops.convert_to_tensor(self.thresholds)
      if training:
        num_valid = (
            ops.shape(x)[0]
            if valid is None
            else ops.sum(ops.cast(valid, "int32"))
        )
        m = gating_lib.batchwise_capacity(num_valid, self.k, n)
        mask = gating_lib.batchwise_mask(probs, m, valid)  # eq. (18)
        bw_loss = gating_lib.batchwise_threshold_loss(
            ops.stop_gradient(probs), thresholds, mask, valid
        )  # eq. (20)
        weighted = self.w_batchwise * bw_loss
        result["extra_losses"] = {gating_lib.BATCHWISE_LOSS: weighted}
        result["extra_stats"] = {"batchwise_loss": weighted}
      else:
        mask = gating_lib.threshold_mask(probs, thresholds)  # eq. (19)
      gates = gating_lib.masked_gates(probs, mask)  # eq. (16)
      indices = ops.where(mask > 0, ops.arange(n, dtype="int32")[None, :], n)
    if valid_f is not None:
      gates = gates * valid_f
      indices = ops.where(valid[:, None], indices, n)
    result["expert_ids"] = ops.cast(indices, "int32")
    result["gates"] = gates
    result["importance"] = gating_lib.importance(gates, result["expert_ids"], n)
    return result

  @property
  def aux_loss_names(self):
    """Importance; load for noisy_top_k; L_batchwise for batchwise."""
    names = [gating_lib.IMPORTANCE_LOSS]
    if self.gating == "noisy_top_k":
      names.append(gating_lib.LOAD_LOSS)
    if self.gating == "batchwise":
      names.append(gating_lib.BATCHWISE_LOSS)
    return tuple(names)

  def get_config(self):
    config = super().get_config()
    config.update(
        {
            "num_experts": self.num_experts,
            "k": self.k,
            "gating": self.gating,
            "w_batchwise": self.w_batchwise,
            "small_batch_limit": self.small_batch_limit,
        }
    )
    return config
