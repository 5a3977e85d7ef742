"""`MtTask`: translation with MoE-GNMT (the paper's sections 6-8, appendix E).

Batches of `data_pipelines.MtData` are `({'source', 'target_in'},
target_out, weights)`; the task feeds them to `gnmt_model` as

  x = {'source', 'target_in'},  y = stack([target_out, weights], -1)

so the compiled loss (`masked_token_nll`) is the mean negative
log-likelihood per real target token (sum over tokens / number of tokens,
not over padded positions). The optimizer minimizes it plus the MoE
balancing losses the layers add; the logs show it alone as `loss`, each
balancing loss under its own name and the sum as `total_loss`
(`moe_keras.models.task_model`). The `perplexity` metric is exp of the mean
NLL over everything seen and `tokens` counts target tokens (words/s logging
of `moe_keras.train`).

`evaluate` reports, for the data's evaluation split:
  * perplexity per target wordpiece (teacher forced, [END] included),
  * sacreBLEU of detokenized translations against the raw references, with
    its signature (`bleu`, `bleu_signature`),
  * the paper's tokenized BLEU (`tokenized_bleu`; see `eval.bleu`),
  * the expert statistics of the MoE layers.
Translations come from beam search (`beam_size` > 1) or greedy search.
"""

import contextlib
import time

from absl import logging
import gin
import keras
import numpy as np
import tensorflow as tf

from eval import bleu as bleu_lib
from eval import expert_stats
from eval import perplexity as perplexity_lib
from moe_keras import distribution as distribution_lib
from moe_keras.models import gnmt
from moe_keras.tasks import base

START_ID = 2
END_ID = 3

# The binding that gives JAX TensorFlow's per-piece second moment.
PIECE_SQUARES_BINDING = "gnmt_model.piece_squares=True"


def pack_targets(target_out, weights):
  """[B, T] target ids and weights -> float32 [B, T, 2] (the Keras `y`)."""
  return tf.stack([tf.cast(target_out, tf.float32), weights], axis=-1)


def _nll(y_true, logits):
  targets = keras.ops.cast(y_true[..., 0], "int32")
  weights = keras.ops.cast(y_true[..., 1], "float32")
  nll = keras.ops.sparse_categorical_crossentropy(
      targets, keras.ops.cast(logits, "float32"), from_logits=True
  )
  return nll, weights


def masked_token_nll(y_true, logits):
  """Keras loss: sum over real tokens of -log p(target) / number of tokens.

  Args:
    y_true: float32 [B, T, 2] from `pack_targets`.
    logits: [B, T, V].

  Returns:
    scalar mean NLL per target token.
  """
  nll, weights = _nll(y_true, logits)
  return perplexity_lib.masked_mean_nll(weights, nll)


@keras.saving.register_keras_serializable(package="moe_keras")
class TokenPerplexity(perplexity_lib.Perplexity):
  """`eval.perplexity.Perplexity` over the packed translation targets."""

  def nll_and_weights(self, y_true, y_pred):
    return _nll(y_true, y_pred)


@keras.saving.register_keras_serializable(package="moe_keras")
class TargetTokens(perplexity_lib.TokenCount):
  """`eval.perplexity.TokenCount` over the packed translation targets."""

  def weights(self, y_true):
    return keras.ops.cast(y_true[..., 1], "float32")


def _to_keras(x, target_out, weights):
  return x, pack_targets(target_out, weights)


@contextlib.contextmanager
def moe_stats_detached(model):
  """Detaches the MoE layers' Keras metric trackers while tracing decoding.

  Inside, the layers of `model` update no training statistics, so a
  tf.function traced here captures none of the trackers' (untracked)
  variables and can be exported as a SavedModel.

  Args:
    model: a Keras model with MoE layers (or none).

  Yields:
    None.
  """
  moe_layers = expert_stats.moe_layers(model)
  saved = [layer._stat_trackers for layer in moe_layers]  # pylint: disable=protected-access
  try:
    for layer in moe_layers:
      layer._stat_trackers = {}  # pylint: disable=protected-access
    yield
  finally:
    for layer, trackers in zip(moe_layers, saved):
      layer._stat_trackers = trackers  # pylint: disable=protected-access


class Translator(tf.Module):
  """Strings in, translations out, all in one TensorFlow graph.

  `translate(texts)` (a `tf.function` over tf.string [B]) tokenizes with
  tensorflow-text, decodes with greedy / beam search and detokenizes; it is
  what `moe_keras.export` saves as `serving_default`, and `decode` /
  `evaluate` call the same function, so all three agree.

  Handling of odd inputs (documented behaviour, not errors):
    * an empty (or all-whitespace) source gives an empty translation;
    * a source longer than `max_source_length` wordpieces is truncated to
      its first `max_source_length` pieces (None: no limit);
    * invalid UTF-8 must be replaced before (the CLIs decode with
      errors='replace', so bad bytes become U+FFFD, which the wordpiece
      vocabulary maps to [UNK] unless it knows it).
  """

  def __init__(
      self,
      model,
      tokenizer,
      *,
      beam_size=4,
      alpha=0.6,
      max_length_ratio=2.0,
      max_length_offset=10,
      max_output_length=256,
      max_source_length=None,
      language_token_id=None,
  ):
    super().__init__(name="translator")
    # The Keras model is held outside TF's object tracking (a SavedModel of
    # it would also trace its own serving function, which updates the MoE
    # metrics); its variables are tracked directly.
    self._model_fn = lambda: model
    self.model_variables = [v.value for v in model.variables]
    self._tokenizer = tokenizer
    # Tracked so that a SavedModel keeps the tokenizer's resources.
    self.wordpiece = tokenizer._fast  # pylint: disable=protected-access
    self.beam_size = int(beam_size)
    self.alpha = float(alpha)
    self.max_length_ratio = float(max_length_ratio)
    self.max_length_offset = int(max_length_offset)
    self.max_output_length = max_output_length
    self.max_source_length = max_source_length
    self.language_token_id = language_token_id
    self.translate = tf.function(
        self._translate,
        input_signature=[tf.TensorSpec([None], tf.string, name="inputs")],
    )

  @property
  def model(self):
    return self._model_fn()

  def _translate(self, texts):
    # The Python body runs only while tracing: the MoE layers' Keras metric
    # trackers are detached meanwhile, so decoding neither updates the
    # training statistics nor captures their (untracked) variables, which a
    # SavedModel could not export.
    with moe_stats_detached(self.model):
      return self._translate_graph(texts)

  def _translate_graph(self, texts):
    ids = self._tokenizer.tokenize(texts)
    if self.max_source_length:
      ids = ids[:, : self.max_source_length]
    empty = tf.equal(ids.row_lengths(), 0)
    if self.language_token_id is not None:
      prefix = tf.fill([ids.nrows(), 1], tf.constant(self.language_token_id))
      ids = tf.concat([tf.cast(prefix, ids.dtype), ids], axis=1)
    source = tf.cast(ids.to_tensor(0), tf.int32)
    width = tf.shape(source)[1]
    source = tf.pad(source, [[0, 0], [0, tf.maximum(1 - width, 0)]])
    out = gnmt.generate(
        self.model,
        source,
        beam_size=self.beam_size,
        alpha=self.alpha,
        max_length_ratio=self.max_length_ratio,
        max_length_offset=self.max_length_offset,
        max_length=self.max_output_length,
        start_id=START_ID,
        eos_id=END_ID,
    )
    text = self._tokenizer.detokenize(out["ids"])
    return {
        "translations": tf.where(empty, tf.constant(""), text),
        "ids": out["ids"],
        "scores": out["scores"],
    }

  def translate_texts(self, texts, batch_size=32):
    """Translates a list of str, batching by length; returns a list of str."""
    if not texts:
      return []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
      chunk = order[start : start + batch_size]
      result = self.translate(tf.constant([texts[i] for i in chunk]))
      for i, text in zip(chunk, result["translations"].numpy()):
        out[i] = text.decode("utf-8")
    return out


@gin.configurable
class MtTask(base.Task):
  """Translation on an `MtData` with `gnmt_model`."""

  name = "mt"

  def __init__(
      self,
      data,
      beam_size=4,
      alpha=0.6,
      max_length_ratio=2.0,
      max_length_offset=10,
      max_output_length=256,
      max_source_length=None,
      decode_batch_size=32,
      max_eval_sentences=None,
      target_language=None,
      stats_batches=20,
  ):
    """Creates the task.

    Args:
      data: `data_pipelines.MtData`.
      beam_size: beams in evaluate / decode (1 = greedy).
      alpha: GNMT length-penalty exponent.
      max_length_ratio, max_length_offset: output length limit
        floor(ratio * source pieces) + offset.
      max_output_length: absolute cap on output pieces.
      max_source_length: sources are truncated to this many pieces (None:
        no limit; the data's max_length is a good value).
      decode_batch_size: sentences per decoding batch.
      max_eval_sentences: BLEU on the first N eval pairs only (None: all).
      target_language: '<2xx>' target for multilingual models.
      stats_batches: eval batches for the expert statistics.
    """
    super().__init__(data)
    self.beam_size = beam_size
    self.alpha = alpha
    self.max_length_ratio = max_length_ratio
    self.max_length_offset = max_length_offset
    self.max_output_length = max_output_length
    self.max_source_length = max_source_length
    self.decode_batch_size = decode_batch_size
    self.max_eval_sentences = max_eval_sentences
    self.target_language = target_language
    self.stats_batches = stats_batches

  def build_model(self):
    return gnmt.gnmt_model(self.vocab_size)

  def train_dataset(self, input_context=None):
    warning = base.piece_squares_warning(
        keras.backend.backend(),
        base.bound_value("gnmt_model.piece_squares"),
        PIECE_SQUARES_BINDING,
    )
    if warning:
      logging.warning(warning)
    return super().train_dataset(input_context)

  def compile(self, model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=masked_token_nll,
        metrics=[TokenPerplexity(), TargetTokens()],
    )

  def to_keras(self, x, target_out, weights):
    return _to_keras(x, target_out, weights)

  def count_tokens(self, batch):
    """Target tokens of one (x, y) batch."""
    return int(np.sum(np.asarray(batch[1])[..., 1]))

  def language_token_id(self, target_language=None):
    language = target_language or self.target_language
    if not language:
      return None
    from data_pipelines import wordpiece  # pylint: disable=g-import-not-at-top

    return self.data.vocab.token_to_id(wordpiece.language_token(language))

  def translator(self, model, beam_size=None, alpha=None, target_language=None):
    """A `Translator` with the task's decoding settings (overridable).

    `model` may be a mesh-wrapped model; decoding uses the inner model
    (its MoE layers keep their experts on the mesh's devices).

    Raises:
      TranslationError: not on TensorFlow (`require_tensorflow`).
    """
    require_tensorflow("translation (decoding, export)")
    return Translator(
        distribution_lib.Distribution.unwrap(model),
        self.data.tokenizer,
        beam_size=self.beam_size if beam_size is None else beam_size,
        alpha=self.alpha if alpha is None else alpha,
        max_length_ratio=self.max_length_ratio,
        max_length_offset=self.max_length_offset,
        max_output_length=self.max_output_length,
        max_source_length=self.max_source_length,
        language_token_id=self.language_token_id(target_language),
    )

  def perplexity(self, model, dataset):
    """Per-token perplexity over a dataset of (x, y) batches."""
    total, tokens = 0.0, 0.0

    @tf.function
    def batch_nll(x, y):
      nll, weights = _nll(y, model(x, training=False))
      return tf.reduce_sum(nll * weights), tf.reduce_sum(weights)

    for x, y in dataset:
      nll, count = batch_nll(x, y)
      total += float(nll)
      tokens += float(count)
    if tokens == 0:
      raise ValueError("the evaluation split has no target tokens")
    return float(np.exp(total / tokens)), total / tokens, int(tokens)

  def evaluate(
      self,
      model,
      split,
      model_dir,
      beam_size=None,
      alpha=None,
      max_sentences=None,
      output_file=None,
      **options,
  ):
    """Perplexity, sacreBLEU + signature, tokenized BLEU, expert statistics.

    Args:
      model: the restored GNMT.
      split: label of the split (the data's eval split).
      model_dir: the run directory (translations are written to
        DIR/translations_<split>.txt unless output_file is given).
      beam_size, alpha: override the task's decoding settings.
      max_sentences: BLEU on the first N pairs only.
      output_file: where to write the translations.
      **options: ignored (e.g. plot).

    Returns:
      dict: split, perplexity, mean_nll, tokens, bleu, bleu_signature,
      tokenized_bleu, tokenized_bleu_signature, sacrebleu / tokenized
      details, sentences, beam_size, alpha, sentences_per_sec, experts.

    Raises:
      ValueError: no evaluation split, or no sentences.
      TranslationError: not on TensorFlow (`require_tensorflow`).
    """
    del options
    require_tensorflow("translation evaluation (perplexity, BLEU)")
    dataset = self.eval_dataset()
    if dataset is None:
      raise ValueError("the data has no evaluation split (EVAL_FILES)")
    ppl, mean_nll, tokens = self.perplexity(model, dataset)
    pairs = self.data.eval_pairs()
    limit = max_sentences or self.max_eval_sentences
    if limit:
      pairs = pairs[:limit]
    if not pairs:
      raise ValueError(f"the {split} split has no sentence pairs")
    beam = self.beam_size if beam_size is None else beam_size
    alpha = self.alpha if alpha is None else alpha
    hyps = []
    start = time.time()
    by_language = {}
    for i, (_, _, language) in enumerate(pairs):
      by_language.setdefault(language, []).append(i)
    hyps = [None] * len(pairs)
    for language, indices in by_language.items():
      translator = self.translator(
          model, beam_size=beam, alpha=alpha, target_language=language
      )
      out = translator.translate_texts(
          [pairs[i][0] for i in indices], batch_size=self.decode_batch_size
      )
      for i, text in zip(indices, out):
        hyps[i] = text
    elapsed = time.time() - start
    refs = [ref for _, ref, _ in pairs]
    sacre = bleu_lib.sacre_bleu(hyps, refs)
    tokenized = bleu_lib.tokenized_bleu(hyps, refs)
    import os  # pylint: disable=g-import-not-at-top

    output_file = output_file or os.path.join(
        model_dir, f"translations_{split}.txt"
    )
    with open(output_file, "w", encoding="utf-8") as f:
      f.writelines(h.replace("\n", " ") + "\n" for h in hyps)
    stats = expert_stats.collect_expert_stats(
        distribution_lib.Distribution.unwrap(model),
        dataset,
        max_batches=self.stats_batches,
    )
    result = {
        "split": split,
        "perplexity": ppl,
        "mean_nll": mean_nll,
        "tokens": tokens,
        "bleu": sacre.score,
        "bleu_signature": sacre.signature,
        "tokenized_bleu": tokenized.score,
        "tokenized_bleu_signature": tokenized.signature,
        "sacrebleu": sacre.as_dict(),
        "tokenized": tokenized.as_dict(),
        "sentences": len(pairs),
        "beam_size": beam,
        "alpha": alpha,
        "sentences_per_sec": len(pairs) / max(elapsed, 1e-9),
        "translations_file": output_file,
        "experts": stats,
    }
    logging.info(
        "%s: BLEU %.2f (%s), tokenized BLEU %.2f, perplexity %.3f",
        split,
        sacre.score,
        sacre.signature,
        tokenized.score,
        ppl,
    )
    return result


class TranslationError(ValueError):
  """Bad input or setup for translation (one-line message)."""


def require_tensorflow(what):
  """Raises TranslationError unless Keras runs on TensorFlow.

  The translator is a TensorFlow graph (the wordpiece tokenizer and beam
  search in a `tf.function`, exported as a SavedModel), and so is the
  perplexity loop; a JAX-trained checkpoint loads on TensorFlow.

  Args:
    what: what needs TensorFlow, for the message.

  Raises:
    TranslationError: another backend.
  """
  backend = keras.backend.backend()
  if backend != "tensorflow":
    raise TranslationError(
        f"{what} runs on TensorFlow only (its tokenizer and beam search are"
        f" a TensorFlow graph), not on {backend}; rerun with"
        " KERAS_BACKEND=tensorflow, which loads this checkpoint"
    )


def check_target_language(task, target_lang):
  """A multilingual model needs a known target language."""
  tokens = getattr(task.data, "language_tokens", ())
  language = target_lang or task.target_language
  if tokens and not language:
    raise TranslationError(
        "this model is multilingual: pass --target_lang (one of"
        f" {', '.join(t[2:-1] for t in tokens)})"
    )
  if language and tokens and f"<2{language}>" not in tokens:
    raise TranslationError(
        f"--target_lang={language} is not one of the model's languages"
        f" ({', '.join(t[2:-1] for t in tokens)})"
    )
