"""The hook through which expert placement extends the MoE layers.

An MoE layer (`MoEBase`) keeps its experts as stacked single-device
variables [n, ...] unless the installed `ExpertPlacement` creates them
elsewhere. The layers know only this interface, never who implements it:
`moe_keras.distribution.sharded_experts` installs the TensorFlow placement
(expert blocks on several devices, paper section 3) when it is imported, so
imports flow one way (distribution -> layers).

A placement's `build_experts` returns None (the layer builds its own
variables) or a holder of the layer's experts with these methods, which the
layer then delegates to:

  run(plan, rows) -> [R, d_out]: the experts on the dispatched rows.
  call_hierarchical(inputs, training, mask, return_stats, noise): the whole
    `HierarchicalSparseMoE.call` (only for placements that shard one).
  save_own_variables(store) / load_own_variables(store): checkpoints as the
    single-device layer writes them.

A placement also decides how the balancing losses of data-parallel replicas
combine: `scale_loss` (each call's share of the step's loss) and, for
layers with balance_over="global", `global_balance_sums`.
"""


class ExpertPlacement:
  """Experts on one device: the default, and the interface to override."""

  def will_shard(self, layer):
    """Whether `build_experts(layer, ...)` will create `layer`'s experts.

    Args:
      layer: an MoEBase being built (a hierarchical layer asks before it
        creates its secondary gates).

    Returns:
      bool.
    """
    del layer
    return False

  def build_experts(self, layer, input_dim):
    """Creates `layer`'s experts elsewhere and returns their holder.

    Args:
      layer: an MoEBase being built.
      input_dim: d.

    Returns:
      None: the layer creates its usual single-device variables.

    Raises:
      ValueError: the layer names `expert_devices`, which only an installed
        placement (moe_keras.distribution) can honour.
    """
    del input_dim
    if layer.expert_devices is not None:
      raise ValueError(
          f"{layer.name}: expert_devices needs the expert placement of"
          " moe_keras.distribution; `import moe_keras.distribution` first"
      )
    return None

  def scale_loss(self, loss):
    """An MoE balancing loss as this call's share of the step's (identity)."""
    return loss

  def global_balance_sums(self, layer, sums):
    """The balancing sums of the step's global batch, from one call's.

    For a layer with balance_over="global", in training. The default is for
    one program over the global batch (one device; JAX SPMD under a
    keras.distribution, whose tensors span the whole batch): this call's
    sums already are the global batch's.

    Args:
      layer: the calling MoEBase.
      sums: dict {name: float32 tensor} of sums over this call's tokens
        (`MoEBase._balance_sums`: Importance [n], Load [n], ...).

    Returns:
      A dict like `sums`, summed over every data-parallel replica of the
      step (here: `sums`); or None when the placement keeps `sums` and will
      call `layer.add_global_balancing_losses(summed)` itself once all
      replicas have made this call.
    """
    del layer
    return sums


_INSTALLED = [ExpertPlacement()]


def install(placement):
  """Makes `placement` the one every MoE layer uses from now on.

  Args:
    placement: an ExpertPlacement.

  Returns:
    The placement it replaces.

  Raises:
    TypeError: `placement` is not an ExpertPlacement.
  """
  if not isinstance(placement, ExpertPlacement):
    raise TypeError(
        f"expected an ExpertPlacement, got {type(placement).__name__}"
    )
  previous = _INSTALLED[0]
  _INSTALLED[0] = placement
  return previous


def current():
  """The installed ExpertPlacement."""
  return _INSTALLED[0]
