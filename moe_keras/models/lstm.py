"""LSTM with an optional output projection (LSTMP), as used by the paper.

The paper's baselines and large models use LSTMs "with projection"
(LSTM-2048-512: 2048 cells whose output is projected to 512; MoE-143M: 4096
cells projected to 1024; GNMT: 2048 cells projected to 512), the LSTMP of
Sak et al. (2014) used by Jozefowicz et al. (2016). Keras has no projected
LSTM, so this module provides one.

  z_t = x_t W + r_{t-1} U + b                  (4 gates: i, f, g, o)
  c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
  h_t = sigmoid(o) * tanh(c_t)
  r_t = h_t P   (projection; r_t = h_t without it)

Multiply-adds per timestep (the paper's ops count): 4u(d_in + p) + u p with
p the projection size (4u(d_in + u) without projection).

`ProjectedLSTMCell` runs one step (decoders call it directly with cached
state); `ProjectedLSTM` runs a whole sequence and computes `x_t W` for all
timesteps in one matmul before the recurrence, which on CPU is most of the
speed of the layer.
"""

import keras
from keras import ops

FORGET_BIAS = 1.0


def lstm_ops_per_timestep(input_dim, units, projection_units=None):
  """Forward multiply-adds per example per timestep of one (projected) LSTM.

  Args:
    input_dim: d_in.
    units: u, the number of cells.
    projection_units: p, or None for a plain LSTM (p = u, no projection).

  Returns:
    int, 4u(d_in + p) + u p (the u p term only with a projection). These
    are also the parameter count without biases.
  """
  recurrent = projection_units or units
  count = 4 * units * (input_dim + recurrent)
  if projection_units:
    count += units * projection_units
  return count


@keras.saving.register_keras_serializable(package="moe_keras")
class ProjectedLSTMCell(keras.layers.Layer):
  """One step of an LSTM with optional projection.

  State: [r [B, p], c [B, u]] with p = projection_units or units.
  Usable in `keras.layers.RNN` and step by step in decoders.
  """

  def __init__(self, units, projection_units=None, **kwargs):
    super().__init__(**kwargs)
    if not isinstance(units, int) or units < 1:
      raise ValueError(f"units must be an int >= 1, got {units!r}")
    if projection_units is not None and (
        not isinstance(projection_units, int) or projection_units < 1
    ):
      raise ValueError(
          f"projection_units must be None or an int >= 1, got"
          f" {projection_units!r}"
      )
    self.units = units
    self.projection_units = projection_units
    self.output_size = projection_units or units
    self.state_size = [self.output_size, units]

  def build(self, input_shape):
    input_dim = input_shape[-1]
    u, p = self.units, self.output_size
    self.kernel = self.add_weight(
        name="kernel", shape=(input_dim, 4 * u), initializer="glorot_uniform"
    )
    self.recurrent_kernel = self.add_weight(
        name="recurrent_kernel", shape=(p, 4 * u), initializer="orthogonal"
    )

    def bias_init(shape, dtype=None):
      del shape
      return ops.concatenate(
          [
              ops.zeros((u,), dtype=dtype),
              ops.full((u,), FORGET_BIAS, dtype=dtype),
              ops.zeros((2 * u,), dtype=dtype),
          ]
      )

    self.bias = self.add_weight(
        name="bias", shape=(4 * u,), initializer=bias_init
    )
    if self.projection_units:
      self.projection = self.add_weight(
          name="projection",
          shape=(u, self.projection_units),
          initializer="glorot_uniform",
      )
    else:
      self.projection = None

  def step_from_projected(self, z_input, states):
    """One step given the precomputed input term x_t W + b.

    Args:
      z_input: [B, 4u].
      states: [r [B, p], c [B, u]].

    Returns:
      (r_t [B, p], [r_t, c_t]).
    """
    r_prev, c_prev = states
    z = z_input + ops.matmul(r_prev, self.recurrent_kernel)
    i, f, g, o = ops.split(z, 4, axis=-1)
    c = ops.sigmoid(f) * c_prev + ops.sigmoid(i) * ops.tanh(g)
    h = ops.sigmoid(o) * ops.tanh(c)
    r = h if self.projection is None else ops.matmul(h, self.projection)
    return r, [r, c]

  def call(self, inputs, states, training=None):
    del training
    z_input = ops.matmul(inputs, self.kernel) + self.bias
    return self.step_from_projected(z_input, states)

  def get_initial_state(self, batch_size=None):
    return [
        ops.zeros((batch_size, self.output_size), dtype=self.compute_dtype),
        ops.zeros((batch_size, self.units), dtype=self.compute_dtype),
    ]

  def get_config(self):
    config = super().get_config()
    config.update(
        {"units": self.units, "projection_units": self.projection_units}
    )
    return config


@keras.saving.register_keras_serializable(package="moe_keras")
class ProjectedLSTM(keras.layers.Layer):
  """Sequence LSTM (optional projection) over [B, T, d_in] inputs.

  Right-padded batches need no mask: padding comes after every real
  position, so it cannot change the outputs at real positions.
  """

  def __init__(
      self,
      units,
      projection_units=None,
      return_state=False,
      go_backwards=False,
      **kwargs,
  ):
    super().__init__(**kwargs)
    self.cell = ProjectedLSTMCell(
        units, projection_units=projection_units, name="cell"
    )
    self.units = units
    self.projection_units = projection_units
    self.return_state = bool(return_state)
    self.go_backwards = bool(go_backwards)
    self.supports_masking = True

  def build(self, input_shape):
    self.cell.build(input_shape)

  def compute_mask(self, inputs, mask=None):
    return mask

  def call(self, inputs, initial_state=None, training=None):
    """Runs the LSTM over time.

    Args:
      inputs: [B, T, d_in].
      initial_state: optional [r [B, p], c [B, u]].
      training: unused (no dropout inside the cell).

    Returns:
      outputs [B, T, p] (in input order, also with go_backwards), and with
      return_state the final [r, c].
    """
    del training
    cell = self.cell
    z_all = ops.matmul(inputs, cell.kernel) + cell.bias  # [B, T, 4u]
    z_time_major = ops.transpose(z_all, (1, 0, 2))  # [T, B, 4u]
    if self.go_backwards:
      z_time_major = ops.flip(z_time_major, axis=0)
    if initial_state is None:
      initial_state = cell.get_initial_state(ops.shape(inputs)[0])

    p = cell.output_size

    def step(carry, z_t):
      # The carry is [r | c] in one tensor, and it is also the per-step
      # output: Keras's TensorFlow `ops.scan` requires the outputs to have
      # the carry's structure and shape. r is sliced out afterwards.
      r_t, (_, c_t) = cell.step_from_projected(
          z_t, [carry[:, :p], carry[:, p:]]
      )
      new_carry = ops.concatenate([r_t, c_t], axis=-1)
      return new_carry, new_carry

    carry, outputs = ops.scan(
        step, ops.concatenate(list(initial_state), axis=-1), z_time_major
    )
    outputs = outputs[..., :p]
    final = [carry[:, :p], carry[:, p:]]
    if self.go_backwards:
      outputs = ops.flip(outputs, axis=0)
    outputs = ops.transpose(outputs, (1, 0, 2))
    if self.return_state:
      return outputs, list(final)
    return outputs

  def compute_output_shape(self, input_shape):
    out = tuple(input_shape[:-1]) + (self.projection_units or self.units,)
    if self.return_state:
      p = self.projection_units or self.units
      return out, [(input_shape[0], p), (input_shape[0], self.units)]
    return out

  def get_config(self):
    config = super().get_config()
    config.update(
        {
            "units": self.units,
            "projection_units": self.projection_units,
            "return_state": self.return_state,
            "go_backwards": self.go_backwards,
        }
    )
    return config
