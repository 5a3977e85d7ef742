"""Every gin/mt config parses; paper sizes and compute matching hold."""

import glob
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin
import numpy as np
import pytest

from moe_keras import experiment
from moe_keras.models import gnmt

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
CONFIGS = sorted(
    os.path.relpath(f, REPO)
    for f in glob.glob(os.path.join(REPO, "gin/mt/**/*.gin"), recursive=True)
    if "/common/" not in f
    and not (f.endswith("/base.gin") and "/tiny/" not in f)
    and not f.endswith("/tiny/model.gin")
)
ARCH = (
    "model_dim",
    "lstm_units",
    "lstm_projection",
    "encoder_layers",
    "decoder_layers",
    "attention_units",
)


def _resolve(value):
  """Evaluates a gin macro / @fn() reference as gin would at call time."""
  if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
    return value.scoped_configurable_fn()
  return value


def _counts(path):
  gin.clear_config()
  experiment.parse_gin([path])
  kwargs = {}
  for name in ARCH + ("moe",):
    try:
      kwargs[name] = _resolve(gin.query_parameter(f"gnmt_model.{name}"))
    except ValueError:
      pass
  counts = gnmt.count_gnmt(**kwargs)
  gin.clear_config()
  return counts


@pytest.mark.parametrize("path", CONFIGS)
def test_config_parses_and_counts(path):
  counts = _counts(path)
  assert counts["params_excl"] > 0 and counts["ops_per_timestep"] > 0


def test_paper_moe_2048_size():
  for pair in ("wmt14_en_fr", "wmt14_en_de"):
    counts = _counts(f"gin/mt/{pair}/moe_2048_h.gin")
    assert 8.6e9 < counts["params_excl"] < 8.8e9  # the paper: 8.7B


@pytest.mark.parametrize(
    "directory,moe_names",
    [
        ("wmt14_en_fr", ("moe_2048_h", "moe_32")),
        ("wmt14_en_de", ("moe_2048_h", "moe_32")),
        ("debian_en_fr", ("moe_32", "moe_32_h")),
        ("debian_en_de", ("moe_32", "moe_32_h")),
        ("multilingual", ("moe_512",)),
    ],
)
def test_dense_baseline_matches_ops_per_timestep(directory, moe_names):
  dense = _counts(f"gin/mt/{directory}/gnmt_dense.gin")["ops_per_timestep"]
  for name in moe_names:
    moe = _counts(f"gin/mt/{directory}/{name}.gin")["ops_per_timestep"]
    # Equal expert ops; only the gating networks differ.
    np.testing.assert_allclose(moe, dense, rtol=0.05)


@pytest.mark.parametrize("name", ["dense", "moe_flat", "moe_hierarchical"])
def test_tiny_configs_build_and_run(name):
  gin.clear_config()
  experiment.parse_gin([f"gin/mt/tiny/{name}.gin"])
  model = gnmt.gnmt_model(50)
  gin.clear_config()
  x = {
      "source": np.ones((2, 3), "int32"),
      "target_in": np.ones((2, 4), "int32"),
  }
  assert tuple(model(x).shape) == (2, 4, 50)
