"""The paper's LSTM language models (appendix C, Table 7), flat and hierarchical.

  embedding -> layer_1 -> ... -> layer_L -> softmax

with `in + Dropout(f(in))` around every LSTM layer, `in + Dropout(Sigmoid(
MoE(in)))` around the MoE, and dropout on the embedding output (appendix C:
"every non-softmax layer"). Table 7's models are all this stack:

| model         | layers                 | LSTM                 | MoE                         |
|---------------|------------------------|----------------------|-----------------------------|
| LSTM-2048-512 | lstm                   | 2048 cells, proj 512 | -                           |
| 4xLSTM-512    | lstm lstm lstm lstm    | 512                  | -                           |
| MoE-1-Wide    | lstm moe lstm          | 512                  | one expert, hidden 4096     |
| MoE-1-Deep    | lstm moe lstm          | 512                  | one expert, 4 x 1024 hidden |
| MoE-4         | lstm moe lstm          | 512                  | 4 experts, dense gate (eq 2)|
| MoE-32/256    | lstm moe lstm          | 512                  | flat, k = 4, hidden 1024    |
| MoE-N-h       | lstm moe lstm          | 512                  | 16 groups, k = 2 + 2        |
| MoE-34M/143M  | lstm moe lstm (d=1024) | 1024 / 4096 proj 1024| hierarchical, hidden 2048 / 8192 |

The model takes {'inputs', 'targets', 'weights'} (the batches of
`data_pipelines.LmData`) and returns the per-token negative log-likelihood
[B, T]: importance-sampled softmax in training when `num_sampled` is set,
the exact softmax otherwise and always in evaluation. `weights` is the
padding mask (padding tokens are not routed to experts).

`count_lm` gives the parameters (excluding embedding and softmax) and the
ops per timestep as the paper counts them (Table 7), from the same
configuration, without building the model.
"""

import gin
import keras
from keras import ops

from moe_keras.layers import piece_squares as piece_squares_lib
from moe_keras.models import blocks
from moe_keras.models import lstm as lstm_lib
from moe_keras.models import softmax as softmax_lib
from moe_keras.models import task_model

LAYER_TYPES = ("lstm", "moe")


@gin.configurable
def lm_config(
    model_dim=512,
    layers=("lstm", "moe", "lstm"),
    lstm_units=None,
    lstm_projection=None,
    dropout=0.1,
    num_sampled=None,
    moe=None,
    seed=None,
    piece_squares=False,
):
  """The architecture of an LM, as a plain dict (gin-configurable).

  Args:
    model_dim: d, the width of the embedding, of every layer's input and
      output (residual stream) and of the MoE's input and output.
    layers: sequence of 'lstm' and 'moe', bottom to top.
    lstm_units: cells per LSTM (default model_dim).
    lstm_projection: projection size of every LSTM (None: no projection;
      the LSTM output width, projection or units, must equal model_dim).
    dropout: DropProb of appendix C, applied to the embedding and to every
      layer output before its residual add.
    num_sampled: softmax candidates sampled in training (None: exact).
    moe: dict from `blocks.moe_spec` (gin: `lm_config.moe = @moe_spec()`);
      required when `layers` has a 'moe'.
    seed: seed of the MoE noise and the softmax sampler (None: random).
    piece_squares: True: the embedding and the sampled softmax's rows get
      squares taps (`moe_keras.layers.piece_squares`), so that Adam's second
      moment sums the squared pieces of a repeated row on every backend, as
      Keras's Adam does on TensorFlow without taps (the measured results'
      optimizer). False: each backend's own behaviour (JAX: Adam as
      written).

  Returns:
    dict of these values (lstm_units resolved).

  Raises:
    ValueError: unknown layer type, a missing MoE spec, or an LSTM whose
      output width differs from model_dim.
  """
  layers = tuple(layers)
  for layer_type in layers:
    if layer_type not in LAYER_TYPES:
      raise ValueError(
          f"unknown LM layer type {layer_type!r}; expected one of"
          f" {', '.join(LAYER_TYPES)}"
      )
  if "moe" in layers and moe is None:
    raise ValueError(
        "lm_config.layers has a 'moe' but no MoE is configured; bind"
        " lm_config.moe = @moe_spec()"
    )
  lstm_units = lstm_units or model_dim
  lstm_out = lstm_projection or lstm_units
  if "lstm" in layers and lstm_out != model_dim:
    raise ValueError(
        f"LSTM output width {lstm_out} (projection or units) must equal"
        f" model_dim={model_dim} for the residual connections"
    )
  return dict(
      model_dim=model_dim,
      layers=layers,
      lstm_units=lstm_units,
      lstm_projection=lstm_projection,
      dropout=float(dropout),
      num_sampled=num_sampled,
      moe=moe,
      seed=seed,
      piece_squares=piece_squares,
  )


def _lstm_layer(config, name):
  if config["lstm_projection"]:
    return lstm_lib.ProjectedLSTM(
        config["lstm_units"],
        projection_units=config["lstm_projection"],
        name=name,
    )
  # Keras's own LSTM is faster than the projected one on CPU.
  return keras.layers.LSTM(
      config["lstm_units"], return_sequences=True, name=name
  )


def build_lm(vocab_size, config=None, name="lm"):
  """Builds the functional LM.

  Args:
    vocab_size: V, the softmax size.
    config: dict from `lm_config` (None: `lm_config()` with gin's bindings).
    name: model name.

  Returns:
    keras.Model (a `task_model.TaskLossModel`: training logs `loss` = the
    compiled loss, each MoE loss under its own name): {'inputs' int32 [B,T],
    'targets' int32 [B,T], 'weights' float32 [B,T]} -> per-token NLL float32
    [B,T].
  """
  config = config or lm_config()
  d = config["model_dim"]
  token_ids = keras.Input((None,), dtype="int32", name="inputs")
  targets = keras.Input((None,), dtype="int32", name="targets")
  weights = keras.Input((None,), dtype="float32", name="weights")
  mask = ops.greater(weights, 0.0)
  embedding = piece_squares_lib.make_embedding(
      vocab_size, d, config.get("piece_squares", False), name="embedding"
  )
  x = embedding(token_ids)
  x = keras.layers.Dropout(config["dropout"], name="embedding_dropout")(x)
  num_lstm = 0
  for layer_type in config["layers"]:
    if layer_type == "lstm":
      layer_name = f"lstm_{num_lstm}"
      num_lstm += 1
      x = blocks.residual(
          x, _lstm_layer(config, layer_name)(x), config["dropout"], layer_name
      )
    else:
      moe = blocks.build_moe(config["moe"], name="moe", seed=config["seed"])
      x = blocks.residual_moe(x, moe, config["dropout"], mask=mask, name="moe")
  nll = softmax_lib.SoftmaxHead(
      vocab_size,
      num_sampled=config["num_sampled"],
      seed=config["seed"],
      piece_squares=config.get("piece_squares", False),
      name="softmax",
  )([x, targets])
  return task_model.TaskLossModel(
      {"inputs": token_ids, "targets": targets, "weights": weights},
      nll,
      name=name,
  )


def count_lm(config, vocab_size=None):
  """Parameters and ops per timestep as the paper counts them (Table 7).

  Args:
    config: dict from `lm_config`.
    vocab_size: V; when given, also the total including embedding and
      softmax (the "total" column, 2 V d).

  Returns:
    dict with 'params_excl' (parameters excluding embedding and softmax;
    no biases), 'ops_per_timestep' (forward multiply-adds per example per
    timestep excluding the softmax; only the experts an example uses and
    its gating networks count), 'expert_params', and with vocab_size
    'total_params'.
  """
  d = config["model_dim"]
  params = 0
  ops_count = 0
  expert_params = 0
  for layer_type in config["layers"]:
    if layer_type == "lstm":
      lstm_count = lstm_lib.lstm_ops_per_timestep(
          d, config["lstm_units"], config["lstm_projection"]
      )
      params += lstm_count
      ops_count += lstm_count
    else:
      moe_count = blocks.moe_params(config["moe"], d)
      params += moe_count
      ops_count += blocks.moe_ops_per_timestep(config["moe"], d)
      expert_params += moe_count
  result = {
      "params_excl": params,
      "ops_per_timestep": ops_count,
      "expert_params": expert_params,
  }
  if vocab_size is not None:
    result["total_params"] = params + 2 * vocab_size * d
  return result
