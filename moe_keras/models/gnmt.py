"""MoE-GNMT: the paper's translation model (appendix E), and its dense baseline.

GNMT (Wu et al. 2016) as modified by the paper: an encoder of 3 LSTM layers
(the first bidirectional, as in GNMT) and a decoder of 2, LSTMs with a
projection (2048 cells projected to 512 in the paper; every size here is an
argument), an MoE between encoder layers 2 and 3 and between decoder layers 1
and 2, a shared wordpiece vocabulary and one embedding for source and target.

  encoder:  e = Drop(Emb(source))
            x = e + Drop(BiLSTM(e))           # fw and bw, each d/2 wide
            x = x + Drop(LSTM_2(x))
            x = x + Drop(Sigmoid(MoE(x)))     # = blocks.residual_moe
            x = x + Drop(LSTM_3(x))           # memory X [B, S, d]
  decoder:  e = Drop(Emb(target_in))
            y = e + Drop(LSTM_1(e))           # bottom layer
            a = Attention(query=y, memory=X)  # eq. (22), or (21)
            y = y + Drop(Sigmoid(MoE(y)))
            y = y + Drop(LSTM_2([y; a]))      # context fed to every layer above
            logits = y W_out + b              # [B, T, V]

Choices (the paper and PAPER.md leave them open):

* Attention as GNMT: the bottom decoder layer's output at step j is the query
  and the context goes to the inputs of all decoder layers above the bottom
  one. There is no input feeding (the previous context is not fed to the
  bottom layer), so in training the bottom layer, the attention and the MoE
  run over all T positions at once (the MoE sees B*T tokens, section 3's
  convolutional use), and the decoding state is only the LSTM states.
* Residuals around every LSTM and MoE, `in + Drop(f(in))` as in the paper's
  LMs; above the bottom decoder layer the residual adds the layer input
  without the attention context (GNMT's convention), so widths match.
* The backward encoder LSTM runs on each source reversed within its length,
  so padding never enters its state.
* Dropout (0.4 in the paper's MT models) on the embedding, every LSTM output
  and the MoE output; none inside the recurrences.
* The MoE never sees padding (source != 0, target_in != 0).
* Gating: strictly balanced (`moe_spec.gating='batchwise'`, appendix F) for
  single pairs, whose learned thresholds select the experts at inference
  (eq. 19), so decoding one token at a time needs no batch; noisy top-k for
  the multilingual model and for the hierarchical MoE (HierarchicalSparseMoE
  has only noisy top-k: how the paper combined appendix F with hierarchical
  gating is not stated).
* Dense baseline: `moe=None` (no MoE layer) or `moe_spec.kind='ffn'` (one
  dense ReLU network at the MoE's place, e.g. hidden k*h for equal ops per
  timestep).
* The training model is functional (so the lead's expert statistics can probe
  its MoE layers); `GnmtLayers` runs the same layers for inference.
* Output softmax: a separate [d, V] matrix with bias (the paper shares the
  wordpiece vocabulary and embedding between source and target; it does not
  say the softmax is tied).
"""

import gin
import keras
from keras import ops

from moe_keras.layers import piece_squares as piece_squares_lib
from moe_keras.models import attention as attention_lib
from moe_keras.models import blocks
from moe_keras.models import lstm as lstm_lib
from moe_keras.models import task_model

PAD_ID = 0


def reverse_within_length(x, lengths):
  """Reverses each sequence's first `lengths` steps, keeping padding in place.

  Args:
    x: [B, T, d].
    lengths: int32 [B].

  Returns:
    [B, T, d]; row b is x[b, L_b-1], ..., x[b, 0], x[b, L_b], ..., x[b, T-1].
    Applying it twice gives x back.
  """
  t = ops.shape(x)[1]
  steps = ops.arange(t, dtype="int32")[None, :]
  lengths = ops.cast(lengths, "int32")[:, None]
  index = ops.where(steps < lengths, lengths - 1 - steps, steps)
  return ops.take_along_axis(x, index[:, :, None], axis=1)


@keras.saving.register_keras_serializable(package="moe_keras")
class ReverseWithinLength(keras.layers.Layer):
  """`reverse_within_length` as a layer (for dynamic functional shapes)."""

  def call(self, x, lengths):
    return reverse_within_length(x, lengths)

  def compute_output_shape(self, x_shape, lengths_shape):
    del lengths_shape
    return x_shape


def _lstm(units, projection, name):
  return lstm_lib.ProjectedLSTM(units, projection_units=projection, name=name)


class GnmtLayers:
  """The layers of one MoE-GNMT and the code that runs them.

  The same methods build the functional training model (on KerasTensors,
  in `gnmt_model`) and run inference on tensors (`encode`, `initial_state`,
  `decode_step`), so training and decoding cannot drift apart. Every weight
  is used inside a layer's `__call__` on the functional path.
  """

  def __init__(
      self,
      vocab_size,
      model_dim=512,
      lstm_units=2048,
      lstm_projection=512,
      encoder_layers=3,
      decoder_layers=2,
      moe=None,
      encoder_moe_after=2,
      decoder_moe_after=1,
      dropout=0.4,
      attention_units=None,
      attention_kind="factored",
      seed=None,
      piece_squares=False,
  ):
    if encoder_layers < 2 or decoder_layers < 2:
      raise ValueError(
          f"GNMT needs >= 2 encoder and decoder layers, got {encoder_layers}"
          f" and {decoder_layers}"
      )
    out_width = lstm_projection or lstm_units
    if out_width != model_dim:
      raise ValueError(
          f"LSTM output width {out_width} (projection or units) must equal"
          f" model_dim={model_dim} for the residual connections"
      )
    if model_dim % 2:
      raise ValueError(
          f"model_dim={model_dim} must be even (the bidirectional layer's"
          " two directions are model_dim/2 wide each)"
      )
    if not 1 <= encoder_moe_after < encoder_layers:
      raise ValueError(
          f"encoder_moe_after={encoder_moe_after} must be in [1,"
          f" {encoder_layers - 1}]"
      )
    if not 1 <= decoder_moe_after < decoder_layers:
      raise ValueError(
          f"decoder_moe_after={decoder_moe_after} must be in [1,"
          f" {decoder_layers - 1}]"
      )
    self.vocab_size = vocab_size
    self.model_dim = model_dim
    self.encoder_moe_after = encoder_moe_after
    self.decoder_moe_after = decoder_moe_after
    d = model_dim
    half_units = lstm_units if lstm_projection else d // 2
    half_proj = d // 2 if lstm_projection else None
    self.embedding = piece_squares_lib.make_embedding(
        vocab_size, d, piece_squares, name="embedding"
    )
    self.reverse = ReverseWithinLength(name="reverse_within_length")
    self.dropout = keras.layers.Dropout(dropout, seed=seed, name="dropout")
    self.encoder_fw = _lstm(half_units, half_proj, "encoder_0_fw")
    self.encoder_bw = _lstm(half_units, half_proj, "encoder_0_bw")
    self.encoder_lstms = [
        _lstm(lstm_units, lstm_projection, f"encoder_{i}")
        for i in range(1, encoder_layers)
    ]
    self.decoder_lstms = [
        _lstm(lstm_units, lstm_projection, f"decoder_{i}")
        for i in range(decoder_layers)
    ]
    self.encoder_moe = self.decoder_moe = None
    if moe is not None:
      self.encoder_moe = blocks.build_moe(moe, name="encoder_moe", seed=seed)
      self.decoder_moe = blocks.build_moe(moe, name="decoder_moe", seed=seed)
    self.attention = attention_lib.SourceAttention(
        attention_units or d, kind=attention_kind, name="attention"
    )
    self.output_layer = keras.layers.Dense(vocab_size, name="softmax")

  # -- pieces ---------------------------------------------------------------

  def _residual(self, x, fx, training):
    return x + self.dropout(fx, training=training)

  def _residual_moe(self, moe, x, mask, training):
    """x + Drop(Sigmoid(MoE(x))), as `blocks.residual_moe`."""
    if moe is None:
      return x
    out = moe(x, mask=mask, training=training)
    return self._residual(x, ops.sigmoid(out), training)

  def encode_memory(self, source, training=None):
    """Runs the encoder.

    Args:
      source: int32 [B, S], 0 = padding (right-padded).
      training: dropout and MoE training behaviour (None: Keras's context).

    Returns:
      (memory [B, S, d], mask bool [B, S]).
    """
    mask = ops.not_equal(source, PAD_ID)
    lengths = ops.sum(ops.cast(mask, "int32"), axis=1)
    e = self.dropout(self.embedding(source), training=training)
    fw = self.encoder_fw(e)
    bw = self.reverse(self.encoder_bw(self.reverse(e, lengths)), lengths)
    x = self._residual(e, ops.concatenate([fw, bw], axis=-1), training)
    for i, layer in enumerate(self.encoder_lstms, start=2):
      x = self._residual(x, layer(x), training)
      if i == self.encoder_moe_after:
        x = self._residual_moe(self.encoder_moe, x, mask, training)
    return x, mask

  def _upper_decoder(self, y, context, mask, training, states=None):
    """The decoder MoE and the decoder layers above the bottom one.

    Args:
      y: bottom-layer output [B, T, d] (or [B, d] with `states`).
      context: attention context, same leading shape.
      mask: bool [B, T], or None (every position is a token; decoding).
      training: bool or None.
      states: None (sequence mode) or list of [r, c] per upper layer.

    Returns:
      (top output, new states or None).
    """
    new_states = [] if states is not None else None
    for i, layer in enumerate(self.decoder_lstms[1:], start=1):
      if i == self.decoder_moe_after:
        y = self._residual_moe(self.decoder_moe, y, mask, training)
      inputs = ops.concatenate([y, context], axis=-1)
      if states is None:
        out = layer(inputs)
      else:
        out, state = layer.cell(inputs, states[i - 1])
        new_states.append(state)
      y = self._residual(y, out, training)
    return y, new_states

  def forward(self, source, target_in, training=None):
    """Teacher-forced logits [B, T, V] (the training model's graph)."""
    memory, source_mask = self.encode_memory(source, training)
    target_mask = ops.not_equal(target_in, PAD_ID)
    e = self.dropout(self.embedding(target_in), training=training)
    y = self._residual(e, self.decoder_lstms[0](e), training)
    context = self.attention(y, memory, memory_mask=source_mask)
    y, _ = self._upper_decoder(y, context, target_mask, training)
    return self.output_layer(y)

  # -- inference ------------------------------------------------------------

  def encode(self, source):
    """Encoder outputs for decoding.

    Args:
      source: int32 [B, S] right-padded with 0.

    Returns:
      dict: memory [B, S, d], keys [B, S, n] (attention's query-independent
      part), mask bool [B, S].
    """
    memory, mask = self.encode_memory(ops.cast(source, "int32"), False)
    return {
        "memory": memory,
        "keys": self.attention.precompute(memory),
        "mask": mask,
    }

  def initial_state(self, batch):
    """Zero decoder state: list over decoder layers of [r [B, p], c [B, u]]."""
    return [layer.cell.get_initial_state(batch) for layer in self.decoder_lstms]

  def decode_step(self, ids, state, encoded):
    """One decoding step with explicit cached state.

    Args:
      ids: int32 [N] previous tokens ([START] at the first step).
      state: list over decoder layers of [r [N, p], c [N, u]].
      encoded: dict from `encode` with leading size N (tile it for beams).

    Returns:
      (logits float32 [N, V], new state, attention context [N, d]).
    """
    e = self.embedding(ops.cast(ids, "int32"))
    out, bottom_state = self.decoder_lstms[0].cell(e, state[0])
    y = e + out
    context = self.attention.attend(
        y, encoded["keys"], encoded["memory"], encoded["mask"]
    )[0]
    # Every row of a decoding step is a real token: no mask (the MoE then
    # skips its per-token validity ops).
    y, upper = self._upper_decoder(y, context, None, False, states=state[1:])
    logits = ops.cast(self.output_layer(y), "float32")
    return logits, [bottom_state] + upper, context


def layers_of(model):
  """The `GnmtLayers` of a model built by `gnmt_model`.

  Raises:
    ValueError: the model is not a GNMT.
  """
  layers = getattr(model, "gnmt_layers", None)
  if not isinstance(layers, GnmtLayers):
    raise ValueError(
        f"model {model.name!r} is not a GNMT built by gnmt_model (no"
        " gnmt_layers)"
    )
  return layers


@gin.configurable
def gnmt_model(
    vocab_size,
    model_dim=512,
    lstm_units=2048,
    lstm_projection=512,
    encoder_layers=3,
    decoder_layers=2,
    moe=None,
    encoder_moe_after=2,
    decoder_moe_after=1,
    dropout=0.4,
    attention_units=None,
    attention_kind="factored",
    seed=None,
    piece_squares=False,
    name="gnmt",
):
  """Builds a MoE-GNMT training model; gin-configurable.

  Args:
    vocab_size: V of the shared wordpiece vocabulary.
    model_dim: d, the width of the embedding and of every layer's I/O.
    lstm_units: cells per LSTM (2048 in the paper).
    lstm_projection: projection size (512 in the paper; None: plain LSTMs,
      then lstm_units must equal model_dim).
    encoder_layers: encoder depth (3), the first one bidirectional.
    decoder_layers: decoder depth (2).
    moe: dict from `blocks.moe_spec` (gin: `gnmt_model.moe = @moe_spec()`),
      the same spec for the encoder and decoder MoE; None: no MoE.
    encoder_moe_after: the encoder MoE follows this layer (2: between
      layers 2 and 3).
    decoder_moe_after: the decoder MoE follows this layer (1).
    dropout: DropProb on embeddings, LSTM and MoE outputs (0.4).
    attention_units: n of eqs. (21)/(22) (None: model_dim).
    attention_kind: 'factored' (eq. 22, the paper) or 'additive' (eq. 21).
    seed: dropout / MoE noise seed.
    piece_squares: True: the shared embedding gets a squares tap
      (`moe_keras.layers.piece_squares`), so that Adam's second moment sums
      the squared pieces of a repeated row on every backend, as Keras's Adam
      does on TensorFlow without taps. False: each backend's own behaviour
      (JAX: Adam as written). The softmax is dense and needs no tap.
    name: model name.

  Returns:
    functional keras.Model {'source': int32 [B, S], 'target_in': int32
    [B, T]} -> logits float32 [B, T, V], with the attribute `gnmt_layers`
    (a `GnmtLayers`: encode / initial_state / decode_step for inference);
    a `task_model.TaskLossModel`: training logs `loss` = the compiled loss
    and each MoE loss under its own name.
  """
  layers = GnmtLayers(
      vocab_size,
      model_dim=model_dim,
      lstm_units=lstm_units,
      lstm_projection=lstm_projection,
      encoder_layers=encoder_layers,
      decoder_layers=decoder_layers,
      moe=moe,
      encoder_moe_after=encoder_moe_after,
      decoder_moe_after=decoder_moe_after,
      dropout=dropout,
      attention_units=attention_units,
      attention_kind=attention_kind,
      seed=seed,
      piece_squares=piece_squares,
  )
  source = keras.Input((None,), dtype="int32", name="source")
  target_in = keras.Input((None,), dtype="int32", name="target_in")
  logits = layers.forward(source, target_in)
  model = task_model.TaskLossModel(
      {"source": source, "target_in": target_in}, logits, name=name
  )
  model.gnmt_layers = layers
  return model


def count_gnmt(
    model_dim=512,
    lstm_units=2048,
    lstm_projection=512,
    encoder_layers=3,
    decoder_layers=2,
    moe=None,
    attention_units=None,
):
  """Parameters and forward multiply-adds per timestep, as the paper counts.

  Per source step (encoder) plus per target step (decoder, attention over
  one source position counted as its eq.-(22) matmuls: 2 d n for the
  projections plus n), excluding embedding and softmax; only the experts
  an example uses (`blocks.moe_ops_per_timestep`).

  Returns:
    dict: params_excl, ops_per_timestep, expert_params.
  """
  d = model_dim
  p = lstm_projection
  n = attention_units or d
  half_units = lstm_units if p else d // 2
  half_proj = d // 2 if p else None
  params = 2 * lstm_lib.lstm_ops_per_timestep(d, half_units, half_proj)
  params += (encoder_layers - 1) * lstm_lib.lstm_ops_per_timestep(
      d, lstm_units, p
  )
  params += lstm_lib.lstm_ops_per_timestep(d, lstm_units, p)
  params += (decoder_layers - 1) * lstm_lib.lstm_ops_per_timestep(
      2 * d, lstm_units, p
  )
  params += 2 * d * n + n
  ops_count = params
  expert_params = 0
  if moe is not None:
    expert_params = 2 * blocks.moe_params(moe, d)
    params += expert_params
    ops_count += 2 * blocks.moe_ops_per_timestep(moe, d)
  return {
      "params_excl": params,
      "ops_per_timestep": ops_count,
      "expert_params": expert_params,
  }


def generate(
    model,
    source,
    *,
    beam_size=1,
    alpha=0.6,
    max_length_ratio=2.0,
    max_length_offset=10,
    max_length=None,
    start_id=2,
    eos_id=3,
):
  """Translates a batch of source ids (TensorFlow backend; traceable).

  Args:
    model: a model built by `gnmt_model`.
    source: int32 [B, S] right-padded with 0.
    beam_size: 1 = greedy search, else beam search with this many beams.
    alpha: GNMT length-penalty exponent (beam search only).
    max_length_ratio, max_length_offset: at most
      floor(ratio * source_length) + offset output tokens (EOS included).
    max_length: optional cap on the output length.
    start_id: [START] (data_pipelines.wordpiece: 2).
    eos_id: [END] (3).

  Returns:
    dict: ids int32 [B, T] (best hypothesis, EOS included, 0 after it),
    scores float32 [B] (beam score, or log probability when greedy).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from moe_keras.models import beam_search  # pylint: disable=g-import-not-at-top

  source = tf.cast(source, tf.int32)
  source_lengths = tf.reduce_sum(tf.cast(source != PAD_ID, tf.int32), axis=1)
  max_lengths = beam_search.max_decode_lengths(
      source_lengths, max_length_ratio, max_length_offset, max_length
  )
  layers = layers_of(model)
  encoded = layers.encode(source)
  if beam_size > 1:
    encoded = {
        key: tf.repeat(value, beam_size, axis=0)
        for key, value in encoded.items()
    }

  def step_fn(ids, state, t):
    del t
    logits, state, _ = layers.decode_step(ids, state, encoded)
    return tf.nn.log_softmax(logits), state

  initial = layers.initial_state(tf.shape(source)[0])
  if beam_size == 1:
    out = beam_search.greedy_search(
        step_fn, initial, max_lengths, start_id=start_id, eos_id=eos_id
    )
    return {"ids": out["ids"], "scores": out["log_probs"]}
  out = beam_search.beam_search(
      step_fn,
      initial,
      max_lengths,
      beam_size=beam_size,
      start_id=start_id,
      eos_id=eos_id,
      alpha=alpha,
  )
  return {"ids": out["ids"][:, 0], "scores": out["scores"][:, 0]}
