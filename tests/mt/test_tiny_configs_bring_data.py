"""The tiny MT configs run on the data they bring, never on a user cache."""

import os

import gin
import pytest

import data_pipelines
from moe_keras import experiment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("name", ["moe_flat", "multilingual"])
def test_tiny_config_uses_bundled_data(name, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  gin.clear_config()
  experiment.parse_gin(
      [f"gin/mt/tiny/{name}.gin"],
      [f"DEBIAN_CACHE_DIR = '{tmp_path / 'cache'}'"],
  )
  try:
    data = data_pipelines.get_data()
  finally:
    gin.clear_config()
  assert data.vocab.size <= 200
  batch = next(iter(data.train_dataset()))
  assert batch is not None
  assert not (tmp_path / "cache").exists()
