"""Output softmax of the language models: exact, or importance-sampled.

The paper trains its 1B Word models (793,471 words) with an importance-sampled
softmax (Jean et al. 2015, as in Jozefowicz et al. 2016) and reports
perplexity with the exact softmax. `SoftmaxHead` does both: it takes the top
hidden states and the target ids and returns the per-token negative
log-likelihood, sampled in training when `num_sampled` is set, exact
otherwise (always exact outside training).

Sampling (choices the paper leaves open, documented in BUILD.md): candidates
are drawn with replacement from the log-uniform (Zipfian) distribution

  Q(c) = log((c + 2) / (c + 1)) / log(V + 1),

which fits vocabularies sorted by decreasing frequency (as `WordVocab` is).
With S shared samples per step, every logit is corrected by subtracting
log(S * Q(c)) (the expected count), and a sample equal to a token's target
is removed from that token's candidates ("accidental hit").
"""

import math

import keras
from keras import ops

from moe_keras.layers import piece_squares as piece_squares_lib

ACCIDENTAL_HIT_LOGIT = -1e9


def log_uniform_log_q(ids, vocab_size):
  """log Q(c) of the log-uniform sampler, for int ids of any shape."""
  c = ops.cast(ids, "float32")
  return ops.log(ops.log((c + 2.0) / (c + 1.0)) / math.log(vocab_size + 1.0))


def sample_log_uniform(num_sampled, vocab_size, seed):
  """Draws num_sampled ids in [0, vocab_size) with probability Q(c).

  Inverse CDF: the CDF of Q is log(c + 2) / log(V + 1), so
  c = floor(exp(u log(V + 1))) - 1 for u ~ U[0, 1).

  Returns:
    int32 [num_sampled].
  """
  u = keras.random.uniform((num_sampled,), seed=seed)
  ids = ops.floor(ops.exp(u * math.log(vocab_size + 1.0))) - 1.0
  return ops.cast(ops.clip(ids, 0, vocab_size - 1), "int32")


def exact_nll(hidden, targets, kernel, bias):
  """Exact softmax negative log-likelihood.

  Args:
    hidden: float [N, d].
    targets: int [N].
    kernel: [V, d] output embedding.
    bias: [V].

  Returns:
    float32 [N], -log softmax(hidden kernel^T + bias)[target].
  """
  logits = ops.cast(ops.matmul(hidden, ops.transpose(kernel)) + bias, "float32")
  log_z = ops.logsumexp(logits, axis=-1)
  target_logit = ops.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return log_z - target_logit


def sampled_nll(
    hidden,
    targets,
    kernel,
    bias,
    num_sampled,
    seed,
    sampled_ids=None,
    squares_taps=(None, None),
):
  """Importance-sampled softmax loss (Jean et al. 2015), training only.

  Args:
    hidden: float [N, d].
    targets: int [N].
    kernel: [V, d].
    bias: [V].
    num_sampled: S, candidates shared by the N tokens.
    seed: a keras SeedGenerator.
    sampled_ids: optional int [S] candidates replacing the random draw.
    squares_taps: (kernel's, bias's) squares taps or Nones
      (`piece_squares.take_rows`).

  Returns:
    float32 [N], -log of the target's softmax over {target} + samples with
    logits corrected by -log(S Q(c)).
  """
  vocab_size = kernel.shape[0]
  if sampled_ids is None:
    sampled = sample_log_uniform(num_sampled, vocab_size, seed)
  else:
    sampled = ops.cast(sampled_ids, "int32")
    num_sampled = sampled.shape[0]
  log_s = math.log(num_sampled)
  kernel_tap, bias_tap = squares_taps
  true_w = piece_squares_lib.take_rows(kernel, targets, kernel_tap)  # [N, d]
  true_logit = ops.sum(
      ops.cast(hidden, "float32") * ops.cast(true_w, "float32"), axis=-1
  ) + ops.cast(piece_squares_lib.take_rows(bias, targets, bias_tap), "float32")
  true_logit = true_logit - (log_s + log_uniform_log_q(targets, vocab_size))
  sampled_w = piece_squares_lib.take_rows(kernel, sampled, kernel_tap)  # [S, d]
  sampled_logits = ops.cast(
      ops.matmul(hidden, ops.transpose(sampled_w)), "float32"
  ) + ops.cast(piece_squares_lib.take_rows(bias, sampled, bias_tap), "float32")
  sampled_logits = sampled_logits - (
      log_s + log_uniform_log_q(sampled, vocab_size)
  )
  hits = ops.equal(targets[:, None], sampled[None, :])
  sampled_logits = ops.where(hits, ACCIDENTAL_HIT_LOGIT, sampled_logits)
  logits = ops.concatenate([true_logit[:, None], sampled_logits], axis=-1)
  return ops.logsumexp(logits, axis=-1) - true_logit


@keras.saving.register_keras_serializable(package="moe_keras")
class SoftmaxHead(keras.layers.Layer):
  """Per-token NLL of the targets under a softmax over the vocabulary.

  Variables: `kernel` [V, d] (output embedding) and `bias` [V], float32;
  with `piece_squares`, their squares taps `kernel_piece_squares` and
  `bias_piece_squares` (`moe_keras.layers.piece_squares`: the sampled
  softmax's gathered rows then get the per-piece second moment on every
  backend). Call: `head([hidden [B, T, d], targets int [B, T]], training)`
  -> float32 [B, T]. Exact in evaluation; in training sampled with
  `num_sampled` candidates, or exact when `num_sampled` is None or >= V.
  """

  def __init__(
      self,
      vocab_size,
      num_sampled=None,
      seed=None,
      piece_squares=False,
      **kwargs,
  ):
    super().__init__(**kwargs)
    piece_squares_lib.check_piece_squares(piece_squares)
    if not isinstance(vocab_size, int) or vocab_size < 2:
      raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if num_sampled is not None and (
        not isinstance(num_sampled, int) or num_sampled < 1
    ):
      raise ValueError(
          f"num_sampled must be None (exact softmax) or an int >= 1, got"
          f" {num_sampled!r}"
      )
    self.vocab_size = vocab_size
    self.num_sampled = num_sampled
    self.seed = seed
    self.piece_squares = piece_squares
    self.seed_generator = keras.random.SeedGenerator(seed)
    self.kernel_piece_squares = None
    self.bias_piece_squares = None

  def build(self, input_shape):
    hidden_shape = input_shape[0]
    self.kernel = self.add_weight(
        name="kernel",
        shape=(self.vocab_size, hidden_shape[-1]),
        initializer="glorot_uniform",
    )
    self.bias = self.add_weight(
        name="bias", shape=(self.vocab_size,), initializer="zeros"
    )
    if self.piece_squares and self._sampled_in_training():
      self.kernel_piece_squares = piece_squares_lib.add_squares_tap(
          self, self.kernel
      )
      self.bias_piece_squares = piece_squares_lib.add_squares_tap(
          self, self.bias
      )

  def _sampled_in_training(self):
    return bool(self.num_sampled) and self.num_sampled < self.vocab_size

  def logits(self, hidden):
    """Full logits [..., V] (decoding, sampling text)."""
    return ops.matmul(hidden, ops.transpose(self.kernel)) + self.bias

  def call(self, inputs, training=None):
    hidden, targets = inputs
    leading = ops.shape(targets)
    flat_hidden = ops.reshape(hidden, (-1, hidden.shape[-1]))
    flat_targets = ops.reshape(ops.cast(targets, "int32"), (-1,))
    if training and self._sampled_in_training():
      nll = sampled_nll(
          flat_hidden,
          flat_targets,
          self.kernel,
          self.bias,
          self.num_sampled,
          self.seed_generator,
          squares_taps=(self.kernel_piece_squares, self.bias_piece_squares),
      )
    else:
      nll = exact_nll(flat_hidden, flat_targets, self.kernel, self.bias)
    return ops.reshape(nll, leading)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[1])

  def get_config(self):
    config = super().get_config()
    config.update(
        {
            "vocab_size": self.vocab_size,
            "num_sampled": self.num_sampled,
            "seed": self.seed,
            "piece_squares": self.piece_squares,
        }
    )
    return config
