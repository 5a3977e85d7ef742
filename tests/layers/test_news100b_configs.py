"""The 100B-word configs (gin/lm/news100b/) count as Table 8 says.

Table 8 gives ops/timestep and parameters excluding embedding and softmax in
millions (one decimal) and the total in billions (one decimal). The
vocabulary of the 100B-word corpus is NOT STATED; 2 V d with V = 100,000
words (an assumption, the round number that reproduces every total) matches
all eight totals.

Only the counting is tested here (MoE-131072-h has 137.6B parameters);
`test_small_news100b_configs_build` builds the three smallest models with
their real sizes except the expert hidden size.
"""

import glob
import math
import os

import gin
import keras
import numpy as np
import pytest

import data_pipelines  # pylint: disable=unused-import (gin: get_data)
from moe_keras import experiment
from moe_keras.models import lm
from moe_keras.optimizers import factored_adam
from moe_keras.optimizers import factory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
NEWS_VOCAB = 100_000  # assumption, see the module docstring

# file: (ops/timestep M, params excl. M, total B, primary groups a, b).
TABLE_8 = {
    "4xlstm_512": (8.4, 8.4, 0.1, None, None),
    "moe_32": (8.4, 37.8, 0.1, None, None),
    "moe_256_h": (8.4, 272.9, 0.4, 32, 8),
    "moe_1024_h": (8.5, 1079.0, 1.2, 32, 32),
    "moe_4096_h": (8.6, 4303.4, 4.4, 64, 64),
    "moe_16384_h": (8.8, 17201.0, 17.3, 128, 128),
    "moe_65536_h": (9.2, 68791.0, 68.9, 256, 256),
    "moe_131072_h": (9.7, 137577.6, 137.7, 256, 512),
}


def _one_decimal(value):
  """The table's possible printings of value: rounded or truncated."""
  return {round(value, 1), math.floor(value * 10 + 1e-9) / 10}


def _config_for(name, bindings=()):
  gin.clear_config()
  experiment.parse_gin([f"gin/lm/news100b/{name}.gin"], bindings)
  return lm.lm_config()


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


@pytest.mark.parametrize("name", sorted(TABLE_8))
def test_table_8_counts(name):
  config = _config_for(name)
  counts = lm.count_lm(config, vocab_size=NEWS_VOCAB)
  ops_m, params_m, total_b, a, b = TABLE_8[name]
  assert ops_m in _one_decimal(counts["ops_per_timestep"] / 1e6), counts
  assert params_m in _one_decimal(counts["params_excl"] / 1e6), counts
  assert total_b in _one_decimal(counts["total_params"] / 1e9), counts
  moe = config["moe"]
  if a is not None:
    # The paper's primary branching factors, k = 2 per level.
    assert (moe["num_groups"], moe["experts_per_group"]) == (a, b)
    assert moe["kind"] == "hierarchical"
    assert (moe["k_primary"], moe["k_secondary"]) == (2, 2)
  if "moe" in config["layers"]:
    assert config["layers"] == ("lstm", "moe", "lstm")
    assert moe["expert_hidden_dim"] == 1024 and config["model_dim"] == 512
    assert moe["recompute_expert_activations"] is True
  else:
    assert config["layers"] == ("lstm",) * 4


def test_every_table_8_row_has_a_config():
  files = {
      os.path.basename(f)[:-4]
      for f in glob.glob(os.path.join(REPO, "gin/lm/news100b/*.gin"))
  }
  assert files - {"base"} == set(TABLE_8)


def test_news100b_uses_factored_adam_and_news_data():
  _config_for("moe_1024_h")
  assert "news_lm_data" in str(gin.query_parameter("get_data.data_fn"))
  optimizer = factory.make_optimizer(learning_rate=1e-3)
  assert isinstance(optimizer, factored_adam.FactoredAdam)


@pytest.mark.parametrize("name", ["4xlstm_512", "moe_32", "moe_256_h"])
def test_small_news100b_configs_build(name):
  """Built variables match the counting (expert hidden size 8 here)."""
  config = _config_for(name, ["moe_spec.expert_hidden_dim = 8"])
  keras.utils.set_random_seed(0)
  model = lm.build_lm(vocab_size=50, config=config)
  built = sum(
      int(np.prod(w.shape))
      for w in model.trainable_weights
      if not w.path.startswith(("embedding/", "softmax/"))
      and "bias" not in w.path
  )
  assert built == lm.count_lm(config)["params_excl"]
  batch = {
      "inputs": np.zeros((2, 3), "int32"),
      "targets": np.ones((2, 3), "int32"),
      "weights": np.ones((2, 3), "float32"),
  }
  nll = keras.ops.convert_to_numpy(model(batch, training=False))
  assert nll.shape == (2, 3) and np.all(np.isfinite(nll))
  keras.backend.clear_session()
