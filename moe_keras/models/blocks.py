"""Building blocks shared by the language and translation models.

* `build_moe`: the gin-configurable factory of the MoE layer of a model
  ('flat' SparseMoE, 'hierarchical' HierarchicalSparseMoE, or 'ffn', the
  single dense expert of the MoE-1-Wide / MoE-1-Deep baselines).
* `residual`: the paper's `in + Dropout(f(in))` around every non-softmax
  layer (appendix C), and `residual_moe`: `in + Dropout(Sigmoid(MoE(in)))`.
* `moe_ops_per_timestep` / `moe_params`: the MoE layer's cost as the paper
  counts it (forward multiply-adds per example per timestep, and parameters,
  gating included, biases excluded).
"""

import gin
import keras
from keras import ops

from moe_keras.layers import HierarchicalSparseMoE
from moe_keras.layers import SparseMoE
from moe_keras.layers import sparse_moe

MOE_KINDS = ("flat", "hierarchical", "ffn")


@keras.saving.register_keras_serializable(package="moe_keras")
class FeedForward(keras.layers.Layer):
  """A dense ReLU network d -> h_1 -> ... -> h_L -> d, without biases.

  The single expert of the paper's MoE-1 baselines: MoE-1-Wide has one
  hidden layer of 4096, MoE-1-Deep four hidden layers of 1024 (Table 7).
  With one expert and k = 1 the gate is always 1, so MoE-1 is exactly this
  network.
  """

  def __init__(self, hidden_dims, output_dim=None, **kwargs):
    super().__init__(**kwargs)
    hidden_dims = tuple(int(h) for h in hidden_dims)
    if not hidden_dims or min(hidden_dims) < 1:
      raise ValueError(
          f"hidden_dims must be a non-empty list of ints >= 1, got"
          f" {hidden_dims!r}"
      )
    self.hidden_dims = hidden_dims
    self.output_dim = output_dim
    self.supports_masking = True

  def build(self, input_shape):
    dims = (input_shape[-1],) + self.hidden_dims
    dims += (self.output_dim or input_shape[-1],)
    self.kernels = [
        self.add_weight(
            name=f"kernel_{i}",
            shape=(dims[i], dims[i + 1]),
            initializer="glorot_uniform",
        )
        for i in range(len(dims) - 1)
    ]

  def call(self, inputs, mask=None):
    del mask
    x = inputs
    for i, kernel in enumerate(self.kernels):
      x = ops.matmul(x, kernel)
      if i < len(self.kernels) - 1:
        x = ops.relu(x)
    return x

  def compute_mask(self, inputs, mask=None):
    return mask

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

  def get_config(self):
    config = super().get_config()
    config.update(
        {"hidden_dims": list(self.hidden_dims), "output_dim": self.output_dim}
    )
    return config


@gin.configurable
def moe_spec(
    kind="flat",
    num_experts=None,
    k=4,
    expert_hidden_dim=1024,
    num_groups=None,
    experts_per_group=None,
    k_primary=2,
    k_secondary=2,
    hidden_dims=None,
    gating="noisy_top_k",
    w_importance=0.1,
    w_load=0.1,
    capacity_factor=None,
    noise_epsilon=1e-2,
    noise_scale=1.0,
    recompute_expert_activations=None,
    expert_dtype=None,
    dispatch_mode=None,
    balance_over=None,
    expert_variables=None,
):
  """The MoE layer of a model, as a plain dict (gin-configurable).

  Args:
    kind: 'flat' (SparseMoE, eqs. 1-11), 'hierarchical'
      (HierarchicalSparseMoE, appendix B) or 'ffn' (one dense expert).
    num_experts: flat: n.
    k: flat: experts per example.
    expert_hidden_dim: h of every expert (flat and hierarchical).
    num_groups: hierarchical: a (the primary branching factor).
    experts_per_group: hierarchical: b.
    k_primary: hierarchical: groups per example.
    k_secondary: hierarchical: experts per selected group.
    hidden_dims: ffn: hidden layer sizes, e.g. (4096,) or (1024,)*4.
    gating: flat: 'noisy_top_k', 'top_k', 'softmax' or 'batchwise'.
    w_importance: weight of CV(Importance)^2, eq. (7).
    w_load: weight of CV(Load)^2, eq. (11).
    capacity_factor: None (dropless) or a fixed per-expert capacity factor.
    noise_epsilon: added to the noise std (see BUILD.md).
    noise_scale: multiplies the noise std of eq. (4) (1.0: the paper; an
      ablation, README "Results").
    recompute_expert_activations: None (the layer's default) or a bool,
      passed to the layer when set (appendix D recomputation).
    expert_dtype: None (the layer's dtype) or e.g. "bfloat16": expert
      weights and activations in that dtype, gating kept in float32.
    dispatch_mode: None (the layer's default, 'grouped': a matmul per
      expert) or 'padded' (TensorFlow: one einsum padded to the step's
      largest expert); see moe_keras.layers.dispatch.
    balance_over: None (the layer's default, 'replica') or 'replica' |
      'global': under data parallelism, CV(Importance)^2 and CV(Load)^2
      (eqs. 7, 11; appendix B: 13-14) as the mean of the replicas' values
      ('replica'), or over the global batch, the replicas' Importance and
      Load sums added up before CV^2 ('global', equal to one device on the
      same global batch). One device and JAX (SPMD) compute over the global
      batch under both; see MoEBase and BUILD.md "Distribution". Checked
      by `build_moe` (outside gin, so the error stays one line).
    expert_variables: None (the layer's default, 'auto': one variable per
      expert on TensorFlow's dropless dispatch, where no [n, d, h] weight
      gradient is then written, else stacked), 'stacked' or 'per_expert'
      (see MoEBase). Checkpoints are the same under every layout.

  Returns:
    dict of these arguments.

  Raises:
    ValueError: unknown kind.
  """
  if kind not in MOE_KINDS:
    raise ValueError(
        f"unknown MoE kind {kind!r}; expected one of {', '.join(MOE_KINDS)}"
    )
  return dict(
      kind=kind,
      num_experts=num_experts,
      k=k,
      expert_hidden_dim=expert_hidden_dim,
      num_groups=num_groups,
      experts_per_group=experts_per_group,
      k_primary=k_primary,
      k_secondary=k_secondary,
      hidden_dims=None if hidden_dims is None else tuple(hidden_dims),
      gating=gating,
      w_importance=w_importance,
      w_load=w_load,
      capacity_factor=capacity_factor,
      noise_epsilon=noise_epsilon,
      noise_scale=noise_scale,
      recompute_expert_activations=recompute_expert_activations,
      expert_dtype=expert_dtype,
      dispatch_mode=dispatch_mode,
      balance_over=balance_over,
      expert_variables=expert_variables,
  )


def build_moe(spec, name="moe", seed=None):
  """Builds the layer a `moe_spec` describes.

  Args:
    spec: dict from `moe_spec`.
    name: layer name.
    seed: noise seed (None: random).

  Returns:
    A SparseMoE, HierarchicalSparseMoE or FeedForward layer.

  Raises:
    ValueError: an unknown `balance_over` (for every kind; an 'ffn' layer
      has no balancing losses and ignores a valid one).
  """
  balance_over = spec.get("balance_over")
  if balance_over is not None and (
      not isinstance(balance_over, str)
      or balance_over not in sparse_moe.BALANCE_OVER
  ):
    raise ValueError(
        f"unknown moe_spec.balance_over {balance_over!r}; expected None or"
        f" one of {', '.join(sparse_moe.BALANCE_OVER)}"
    )
  if spec["kind"] == "ffn":
    return FeedForward(spec["hidden_dims"], name=name)
  common = {
      key: spec[key]
      for key in (
          "expert_hidden_dim",
          "w_importance",
          "w_load",
          "capacity_factor",
          "noise_epsilon",
          "noise_scale",
      )
  }
  common.update(
      {
          key: spec[key]
          for key in (
              "recompute_expert_activations",
              "expert_dtype",
              "dispatch_mode",
              "balance_over",
              "expert_variables",
          )
          if spec.get(key) is not None
      }
  )
  if spec["kind"] == "flat":
    return SparseMoE(
        num_experts=spec["num_experts"],
        k=spec["k"],
        gating=spec["gating"],
        seed=seed,
        name=name,
        **common,
    )
  return HierarchicalSparseMoE(
      num_groups=spec["num_groups"],
      experts_per_group=spec["experts_per_group"],
      k_primary=spec["k_primary"],
      k_secondary=spec["k_secondary"],
      seed=seed,
      name=name,
      **common,
  )


def _flat_gate_matrices(spec):
  """[d, n] gating matrices of a flat MoE: W_g, and W_noise if noisy top-k."""
  return 2 if spec["gating"] == "noisy_top_k" else 1


def moe_params(spec, model_dim):
  """Parameters of the MoE layer (gating included, no biases).

  Args:
    spec: dict from `moe_spec`.
    model_dim: d, the layer's input and output width.

  Returns:
    int. Flat: n * 2dh + dn (w_gate) + dn (w_noise, noisy_top_k only).
    Hierarchical: a*b * 2dh + 2da + a * 2db. FFN: the sum of its
    matrices.
  """
  d = model_dim
  if spec["kind"] == "ffn":
    dims = (d,) + tuple(spec["hidden_dims"]) + (d,)
    return sum(dims[i] * dims[i + 1] for i in range(len(dims) - 1))
  h = spec["expert_hidden_dim"]
  if spec["kind"] == "flat":
    n = spec["num_experts"]
    return n * 2 * d * h + _flat_gate_matrices(spec) * d * n
  a, b = spec["num_groups"], spec["experts_per_group"]
  return a * b * 2 * d * h + 2 * d * a + a * 2 * d * b


def moe_ops_per_timestep(spec, model_dim):
  """Forward multiply-adds per example of the MoE layer, as the paper counts.

  Only the experts an example is sent to count, plus the gating networks
  evaluated for it (both W_g and W_noise in training; Table 7's MoE-256 row,
  8.6M, includes 2 * 512 * 256 of gating). MoE-4 uses the dense gate of
  eq. (2), so all 4 experts count.

  Args:
    spec: dict from `moe_spec`.
    model_dim: d.

  Returns:
    int.
  """
  d = model_dim
  if spec["kind"] == "ffn":
    return moe_params(spec, model_dim)
  h = spec["expert_hidden_dim"]
  if spec["kind"] == "flat":
    n = spec["num_experts"]
    # softmax (eq. 2) runs every expert; batchwise gives k on average.
    active = n if spec["gating"] == "softmax" else spec["k"]
    return active * 2 * d * h + _flat_gate_matrices(spec) * d * n
  a, b = spec["num_groups"], spec["experts_per_group"]
  kp, ks = spec["k_primary"], spec["k_secondary"]
  return kp * ks * 2 * d * h + 2 * d * a + kp * 2 * d * b


def residual(x, layer_output, dropout_rate, name):
  """`in + Dropout(f(in))` (appendix C), inverted dropout.

  Args:
    x: [..., d] the block input.
    layer_output: f(x), same shape.
    dropout_rate: DropProb.
    name: prefix of the dropout and add layers.

  Returns:
    [..., d].
  """
  dropped = keras.layers.Dropout(dropout_rate, name=f"{name}_dropout")(
      layer_output
  )
  return keras.layers.Add(name=f"{name}_residual")([x, dropped])


def residual_moe(x, moe, dropout_rate, mask=None, name="moe"):
  """`in + Dropout(Sigmoid(MoE(in)))`, the paper's MoE block.

  Args:
    x: [B, T, d] (functional KerasTensor or tensor).
    moe: the MoE layer (or FeedForward).
    dropout_rate: DropProb.
    mask: optional bool [B, T]; False positions are not routed.
    name: prefix of the layer names.

  Returns:
    [B, T, d].
  """
  moe_out = moe(x, mask=mask) if mask is not None else moe(x)
  activated = keras.layers.Activation("sigmoid", name=f"{name}_sigmoid")(
      moe_out
  )
  return residual(x, activated, dropout_rate, name)
