"""`HierarchicalSparseMoE`: the two-level MoE of appendix B, eqs. (12)-(14).

A primary noisy top-k gate picks k_primary of `a` groups; inside each picked
group i a secondary noisy top-k gate G_i picks k_secondary of its `b` experts:

  (12) y_H = sum_i sum_j G_primary(x)_i G_i(x)_j E_{i,j}(x)
  (13) Importance_H(X)_{i,j} = sum_x G_primary(x)_i G_i(x)_j
  (14) Load_H(X)_{i,j} = Load_primary(X)_i Load_i(X^(i))_j / |X^(i)|,
       X^(i) = {x in X : G_primary(x)_i > 0}

Secondary gates are evaluated only for the groups a token was sent to (the
tokens are dispatched to their groups as to experts), so gating cost grows
with k_primary, not with a. Expert (i, j) is row i*b + j of the stacked expert
kernels, so sharding that axis in blocks of b keeps a group on one device, as
the paper places each secondary MoE.
"""

import keras
from keras import ops

from moe_keras.layers import backend_ops
from moe_keras.layers import dispatch
from moe_keras.layers import expert_placement
from moe_keras.layers import gating as gating_lib
from moe_keras.layers import sparse_moe


@keras.saving.register_keras_serializable(package="moe_keras")
class HierarchicalSparseMoE(sparse_moe.MoEBase):
  """Hierarchical MoE (appendix B) with noisy top-k gating at both levels.

  Variables: primary `w_gate`, `w_noise` [d, a]; secondary
  `w_gate_secondary`, `w_noise_secondary` [a, d, b] (all zero-initialized,
  float32); experts `expert_kernel_1` [a*b, d, h], `expert_kernel_2`
  [a*b, h, d_out] (expert (i, j) at row i*b + j).

  Losses over the a*b entries: w_importance CV(Importance_H)^2 +
  w_load CV(Load_H)^2, so the primary gate gets gradient through Load_H.
  With balance_over="global" (see MoEBase) the replicas add up
  Importance_H and the three sums of eq. (14) (Load_primary, Load_i(X^(i)),
  |X^(i)|) before Load_H and CV^2 are computed: a sum of the replicas'
  Load_H would not be the global batch's.

  `call(..., noise=(primary_noise [N, a], secondary_noise [N, a, b]))`
  replaces the random draws in training (the draws of unselected groups are
  unused).
  """

  def __init__(
      self,
      num_groups,
      experts_per_group,
      expert_hidden_dim,
      k_primary=2,
      k_secondary=2,
      output_dim=None,
      w_importance=0.1,
      w_load=0.1,
      capacity_factor=None,
      **kwargs,
  ):
    sparse_moe._validate_common(  # pylint: disable=protected-access
        num_groups,
        k_primary,
        capacity_factor,
        w_importance,
        w_load,
        k_name="k_primary",
        experts_name="num_groups",
    )
    if not isinstance(experts_per_group, int) or experts_per_group < 1:
      raise ValueError(
          f"experts_per_group must be an int >= 1, got {experts_per_group!r}"
      )
    if (
        not isinstance(k_secondary, int)
        or not 1 <= k_secondary <= experts_per_group
    ):
      raise ValueError(
          f"k_secondary={k_secondary!r} must be an int in [1,"
          f" experts_per_group={experts_per_group}]"
      )
    super().__init__(
        num_experts=num_groups * experts_per_group,
        expert_hidden_dim=expert_hidden_dim,
        output_dim=output_dim,
        w_importance=w_importance,
        w_load=w_load,
        capacity_factor=capacity_factor,
        **kwargs,
    )
    self.num_groups = num_groups
    self.experts_per_group = experts_per_group
    self.k_primary = k_primary
    self.k_secondary = k_secondary
    if backend_ops.backend_name() == "tensorflow":
      # The secondary gates run per group on the rows the primary gate sent
      # there (a grouped matmul whose splits depend on the routing), also in
      # capacity mode: no XLA on TensorFlow (see MoEBase).
      self.supports_jit = False

  def build(self, input_shape):
    input_dim = input_shape[-1]
    if input_dim is None:
      raise ValueError(f"{self.name}: the last input dimension must be known")
    a, b = self.num_groups, self.experts_per_group
    self.w_gate = self._gate_weight("w_gate", (input_dim, a))
    self.w_noise = self._gate_weight("w_noise", (input_dim, a))
    if not expert_placement.current().will_shard(self):
      # Sharded: each group's secondary gates live with its experts.
      self.w_gate_secondary = self._gate_weight(
          "w_gate_secondary", (a, input_dim, b)
      )
      self.w_noise_secondary = self._gate_weight(
          "w_noise_secondary", (a, input_dim, b)
      )
    self._build_experts(input_dim)

  def call(
      self, inputs, training=None, mask=None, return_stats=False, noise=None
  ):
    """MoEBase.call; sharded: each secondary MoE runs on its group's device."""
    if self._expert_shards is not None:
      return self._expert_shards.call_hierarchical(
          inputs, training, mask, return_stats, noise
      )
    return super().call(
        inputs,
        training=training,
        mask=mask,
        return_stats=return_stats,
        noise=noise,
    )

  def _primary_gate(self, x, valid, training, primary_noise):
    """Primary gate, eqs. (3)-(5) over the a groups.

    Args:
      x: float32 [N, d] tokens.
      valid: bool [N] or None.
      training: python bool (noise and load only in training).
      primary_noise: None or float [N, a] standard normal.

    Returns:
      (gates_p float32 [N, kp] (0 for invalid tokens), groups int32 [N, kp]
      (a for invalid tokens), load_primary float32 [a] or None).
    """
    a, kp = self.num_groups, self.k_primary
    valid_f = None if valid is None else ops.cast(valid, "float32")
    load_primary = None
    clean_p = ops.matmul(x, self.w_gate)  # [N, a]
    if training:
      # x . W_noise as its own matmul, as in SparseMoE (slicing one
      # [W_g | W_noise] product pads both halves in the backward pass).
      gates_p, groups, load_primary = gating_lib.noisy_top_k_load(
          clean_p,
          ops.matmul(x, self.w_noise),
          self._noise(ops.shape(clean_p), primary_noise),
          kp,
          self.noise_epsilon,
          self.noise_scale,
          valid=valid_f,
      )  # [a], eqs. (3)-(5), (8)-(10)
    else:
      gates_p, groups = gating_lib.top_k_gates(clean_p, kp)  # [N, kp]
    if valid is not None:
      groups = ops.where(valid[:, None], groups, a)
      gates_p = gates_p * valid_f[:, None]
    return gates_p, groups, load_primary

  def _route(self, tokens, valid, training, noise):
    """Two-level gating; returns the dict described in SparseMoE._route."""
    a, b = self.num_groups, self.experts_per_group
    kp, ks = self.k_primary, self.k_secondary
    primary_noise, secondary_noise = (None, None) if noise is None else noise
    x = ops.cast(tokens, "float32")
    gates_p, groups, load_primary = self._primary_gate(
        x, valid, training, primary_noise
    )

    # Secondary gates, evaluated only on the groups each token was sent to.
    group_plan = dispatch.RoutingPlan(groups, num_experts=a)
    rows = group_plan.dispatch(x)
    routed = ops.less(groups, a)  # [N, kp]
    routed_f = ops.cast(routed, "float32")
    flat = lambda t: ops.reshape(t, (-1, b))
    load_h = load_sums = None
    if training:
      # x . W_i and x . W_noise_i as one grouped matmul (eq. 4 per group).
      kernels = ops.concatenate(
          [
              ops.convert_to_tensor(self.w_gate_secondary),
              ops.convert_to_tensor(self.w_noise_secondary),
          ],
          axis=2,
      )  # [a, d, 2b]
      both = group_plan.gather_back(
          dispatch.grouped_linear(group_plan, rows, kernels)
      )  # [N, kp, 2b]
      clean_s, raw_s = both[..., :b], both[..., b:]
      if secondary_noise is None:
        noise_s = gating_lib.standard_normal(
            ops.shape(clean_s), seed=self.seed_generator
        )
      else:
        noise_s = ops.take_along_axis(
            ops.cast(secondary_noise, "float32"),
            ops.minimum(groups, a - 1)[:, :, None],
            axis=1,
        )
      gates_s, experts_s, probs_s = gating_lib.noisy_top_k(
          flat(clean_s),
          flat(raw_s),
          flat(noise_s),
          ks,
          self.noise_epsilon,
          self.noise_scale,
      )  # eqs. (3)-(5), (8)-(9) inside each group
      probs_s = ops.reshape(probs_s, ops.shape(clean_s)) * routed_f[:, :, None]
      # Load_i(X^(i)): sum of P_i over the tokens sent to group i, [a, b].
      load_secondary = ops.segment_sum(
          ops.reshape(probs_s, (-1, b)),
          ops.reshape(groups, (-1,)),
          num_segments=a + 1,
      )[:a]
      group_sizes = ops.cast(group_plan.token_counts, "float32")  # |X^(i)|
      load_sums = {
          "load_primary": load_primary,
          "load_secondary": load_secondary,
          "group_sizes": group_sizes,
      }
      load_h = gating_lib.hierarchical_load(**load_sums)  # eq. (14)
    else:
      clean_s = group_plan.gather_back(
          dispatch.grouped_linear(
              group_plan, rows, ops.convert_to_tensor(self.w_gate_secondary)
          )
      )  # [N, kp, b]
      gates_s, experts_s = gating_lib.top_k_gates(flat(clean_s), ks)
    gates_s = ops.reshape(gates_s, (-1, kp, ks))
    experts_s = ops.reshape(experts_s, (-1, kp, ks))

    expert_ids = ops.where(
        routed[:, :, None], groups[:, :, None] * b + experts_s, a * b
    )
    gates = gates_p[:, :, None] * gates_s * routed_f[:, :, None]  # eq. (12)
    expert_ids = ops.reshape(expert_ids, (-1, kp * ks))
    gates = ops.reshape(gates, (-1, kp * ks))
    return {
        "expert_ids": ops.cast(expert_ids, "int32"),
        "gates": gates,
        "importance": gating_lib.importance(gates, expert_ids, a * b),  # (13)
        "load": load_h,
        "load_is_smooth": load_h is not None,
        "load_sums": load_sums,
        "extra_stats": {
            "importance_primary": gating_lib.importance(gates_p, groups, a),
            "group_counts": ops.cast(group_plan.token_counts, "float32"),
        },
    }

  def _balance_sums(self, routing):
    """Importance_H [a*b] (eq. 13) and, in training, the sums of eq. (14).

    Args:
      routing: the dict `_route` (or the sharded `call_hierarchical`)
        builds, with "load_sums" {load_primary [a], load_secondary [a, b],
        group_sizes [a]} when the load is smooth.

    Returns:
      dict {"importance": [a*b]} plus those three entries in training; each
      a sum over this call's tokens.
    """
    sums = {"importance": routing["importance"]}
    if routing.get("load_is_smooth"):
      sums.update(routing["load_sums"])
    return sums

  def _balance_vectors(self, sums):
    """(Importance_H [a*b], Load_H [a*b] (eq. 14) or None) from the sums."""
    load = None
    if "load_primary" in sums:
      load = gating_lib.hierarchical_load(
          sums["load_primary"], sums["load_secondary"], sums["group_sizes"]
      )
    return sums["importance"], load

  def get_config(self):
    config = super().get_config()
    config.update(
        {
            "num_groups": self.num_groups,
            "experts_per_group": self.experts_per_group,
            "k_primary": self.k_primary,
            "k_secondary": self.k_secondary,
        }
    )
    return config
