"""benchmarks/lm_gpu.py: the LM grid on JAX without TensorFlow."""

import collections
import hashlib
import json
import math
import os

import numpy as np
import pytest

from benchmarks import lm_gpu
from benchmarks import results_lib
from benchmarks import results_tables
from tests.benchmarks import bench_testlib

FIXTURE = os.path.join(
    bench_testlib.REPO, "tests", "data_pipelines", "fixtures", "debian_docs"
)
BOS, EOS = 0, 1


def _arrays(sentences):
  """An export's arrays of the given sentences (lists of word ids)."""
  ids = [w for s in sentences for w in s]
  offsets = np.cumsum([0] + [len(s) for s in sentences])
  arrays = {
      "format": np.asarray(lm_gpu.ARRAYS_FORMAT),
      "vocab_size": np.asarray(100),
      "bos_id": np.asarray(BOS),
      "eos_id": np.asarray(EOS),
  }
  for split in lm_gpu.SPLITS:
    arrays[f"{split}_ids"] = np.asarray(ids, np.uint16)
    arrays[f"{split}_offsets"] = offsets.astype(np.int64)
  return arrays


def _sentences_of(inputs, targets):
  """Splits packed rows back into sentences: (words, targets) pairs."""
  found = []
  inputs, targets = list(inputs), list(targets)
  starts = [i for i, token in enumerate(inputs) if token == BOS]
  for start, end in zip(starts, starts[1:] + [len(inputs)]):
    found.append((tuple(inputs[start + 1 : end]), tuple(targets[start:end])))
  return found


def test_packed_stream_is_bos_words_then_words_eos_in_order():
  arrays = _arrays([[5, 6], [7], [8, 9, 10]])
  inputs, targets = lm_gpu.packed_stream(
      arrays["train_ids"], arrays["train_offsets"], [2, 0, 1], BOS, EOS
  )
  # Written out by hand: sentence 2, then 0, then 1.
  assert inputs.tolist() == [BOS, 8, 9, 10, BOS, 5, 6, BOS, 7]
  assert targets.tolist() == [8, 9, 10, EOS, 5, 6, EOS, 7, EOS]
  assert inputs.dtype == np.int32 and targets.dtype == np.int32


def test_train_batches_are_seeded_epochs_of_every_sentence_once():
  rng = np.random.default_rng(0)
  sentences = [
      list(rng.integers(2, 100, size=rng.integers(1, 6))) for _ in range(40)
  ]
  arrays = _arrays(sentences)
  total = sum(len(s) + 1 for s in sentences)
  rows, length = 2, 4
  batches = lm_gpu.TrainBatches(arrays, seed=3, rows=rows, pack_length=length)
  assert batches.batches_per_epoch == total // (rows * length)

  def epoch_tokens(first_step):
    parts = [
        batches.batch(step)
        for step in range(first_step, first_step + batches.batches_per_epoch)
    ]
    for x, weights in parts:
      assert x["inputs"].shape == (rows, length)
      assert np.all(weights == 1.0)
    return (
        np.concatenate([x["inputs"].ravel() for x, _ in parts]),
        np.concatenate([x["targets"].ravel() for x, _ in parts]),
    )

  inputs, targets = epoch_tokens(0)
  found = _sentences_of(inputs, targets)
  # Every sentence but those cut by the dropped tail, each once, and each
  # sentence's targets are its words then </S>.
  expected = collections.Counter(tuple(int(w) for w in s) for s in sentences)
  complete = found[:-1]
  assert sum(len(words) + 1 for words, _ in found) >= total - rows * length
  for words, shifted in complete:
    assert shifted == words + (EOS,)
  assert not collections.Counter(w for w, _ in complete) - expected
  assert len(complete) >= len(sentences) - rows * length
  # Seeded: the same seed repeats, another seed and the next epoch reorder.
  again = lm_gpu.TrainBatches(arrays, seed=3, rows=rows, pack_length=length)
  np.testing.assert_array_equal(
      again.batch(1)[0]["inputs"], inputs[8:16].reshape(2, 4)
  )
  other = lm_gpu.TrainBatches(arrays, seed=4, rows=rows, pack_length=length)
  assert not np.array_equal(
      other.batch(0)[0]["inputs"], batches.batch(0)[0]["inputs"]
  )
  next_inputs, _ = epoch_tokens(batches.batches_per_epoch)
  assert not np.array_equal(next_inputs, inputs)
  with pytest.raises(lm_gpu.LmGpuError, match="fewer than one batch"):
    lm_gpu.TrainBatches(arrays, seed=0, rows=total, pack_length=2)


def test_eval_batches_hold_the_whole_split_and_zero_weight_padding():
  sentences = [[5, 6], [7], [8, 9, 10], [11]]
  arrays = _arrays(sentences)
  x, weights = lm_gpu.eval_batches(arrays, "valid", rows=2, pack_length=3)
  # 4 sentences, 7 words: 11 tokens, padded to 2 batches of 2 x 3.
  assert x["inputs"].shape == (4, 3)
  assert weights.sum() == 11.0
  assert weights.ravel().tolist() == [1.0] * 11 + [0.0]
  assert _sentences_of(x["inputs"].ravel()[:11], x["targets"].ravel()[:11]) == [
      (tuple(s), tuple(s) + (EOS,)) for s in sentences
  ]


def test_export_writes_the_corpus_as_ids_of_its_vocabulary(tmp_path):
  path = str(tmp_path / "corpus.npz")
  report = lm_gpu.export_arrays(FIXTURE, path)
  arrays = lm_gpu.load_arrays(path)
  assert report["corpus_build"] == str(arrays["corpus_build"]) == _build()
  with open(os.path.join(FIXTURE, "vocab.txt"), encoding="utf-8") as f:
    tokens = [line.split("\t")[0] for line in f.read().splitlines()]
  assert int(arrays["vocab_size"]) == len(tokens) == report["vocab_size"]
  assert tokens[int(arrays["bos_id"])] == "<S>"
  assert tokens[int(arrays["eos_id"])] == "</S>"
  for split in lm_gpu.SPLITS:
    with open(os.path.join(FIXTURE, f"{split}.txt"), encoding="utf-8") as f:
      lines = [line.split() for line in f if line.split()]
    ids, offsets = arrays[f"{split}_ids"], arrays[f"{split}_offsets"]
    decoded = [
        [tokens[i] for i in ids[offsets[s] : offsets[s + 1]]]
        for s in range(len(offsets) - 1)
    ]
    known = set(tokens)
    assert decoded == [
        [w if w in known else "<UNK>" for w in line] for line in lines
    ]
    assert report[split] == {
        "sentences": len(lines),
        "words": sum(len(l) for l in lines),
    }
  # Not an export: one line.
  with open(path, "wb") as f:
    np.savez(f, other=np.zeros(1))
  with pytest.raises(lm_gpu.LmGpuError, match="not an export"):
    lm_gpu.load_arrays(path)
  for content in (b"", b"PK\x03\x04 truncated"):
    with open(path, "wb") as f:
      f.write(content)
    with pytest.raises(lm_gpu.LmGpuError, match="not a readable .npz export"):
      lm_gpu.load_arrays(path)
  with pytest.raises(lm_gpu.LmGpuError, match="build the corpus"):
    lm_gpu.export_arrays(str(tmp_path), str(tmp_path / "x.npz"))
  assert not os.path.exists(tmp_path / "x.npz")


def _build():
  """The fixture corpus's build id: SHA-256 of its manifest, 12 hex digits.

  The manifest hashed as compact JSON with sorted keys, without the build's
  wall time (the fixture's `"build_seconds": 0.1` removed by hand here).
  """
  with open(os.path.join(FIXTURE, "manifest.json"), encoding="utf-8") as f:
    text = f.read()
  assert '"build_seconds": 0.1,\n' in text
  manifest = json.loads(text.replace('"build_seconds": 0.1,\n', ""))
  compact = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(compact.encode()).hexdigest()[:12]


def _no_tensorflow_env(tmp_path):
  """An environment where `import tensorflow` fails as on the device."""
  stub = tmp_path / "no_tf" / "tensorflow"
  stub.mkdir(parents=True)
  (stub / "__init__.py").write_text(
      "raise ModuleNotFoundError('No module named tensorflow', name='tensorflow')\n"
  )
  return dict(
      os.environ,
      KERAS_BACKEND="jax",
      PYTHONPATH=f"{stub.parent}{os.pathsep}{bench_testlib.REPO}",
  )


def test_trains_a_grid_on_jax_without_tensorflow(tmp_path):
  arrays_path = str(tmp_path / "corpus.npz")
  lm_gpu.export_arrays(FIXTURE, arrays_path)
  results_dir = str(tmp_path / "results")
  flags = [
      "--mode=train",
      f"--arrays={arrays_path}",
      "--configs=moe_4",
      "--seeds=0",
      "--lrs=1e-2",
      "--train_steps=4",
      "--steps_per_eval=2",
      "--rows=4",
      "--pack_length=8",
      "--gin_bindings=MODEL_DIM = 16",
      "--gin_bindings=moe_spec.expert_hidden_dim = 32",
      "--gin_bindings=NUM_SAMPLED = 8",
      # As benchmarks/gpu_lm.sh binds it: squares taps, without TensorFlow.
      "--gin_bindings=lm_config.piece_squares = True",
      f"--results_dir={results_dir}",
  ]
  env = _no_tensorflow_env(tmp_path)
  result = bench_testlib.run_benchmark(
      "lm_gpu.py", *flags, timeout=600, env=env
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "failed" not in result.stdout, result.stdout
  run = results_lib.Run("moe_4", 1e-2, 0, 4)
  summary = results_lib.load_summary(results_dir, run)
  assert summary["backend"] == "jax"
  assert summary["corpus_build"] == _build()
  assert [p["step"] for p in summary["curve"]] == [2, 4]
  assert [p["tokens"] for p in summary["curve"]] == [64.0, 128.0]
  # The fixture's test split: 231 words in 24 sentences, each with </S>.
  assert summary["test"]["tokens"] == 231 + 24
  # A 4-step model of a 107-word vocabulary: near uniform, finite.
  assert 1.0 < summary["test"]["perplexity"] < 3 * 107
  assert math.isfinite(summary["final_dev_perplexity"])
  assert "MODEL_DIM = 16" in summary["bindings"]
  assert "lm_config.piece_squares = True" in summary["bindings"]
  rows = results_tables.collect_rows(
      results_dir, ["moe_4"], [0], 4, {"moe_4": 1e-2}
  )
  assert rows[0].summaries == [summary]
  assert "| moe_4 | 0.01 | 1 |" in result.stdout
  # Rerun: the finished run is not trained again.
  again = bench_testlib.run_benchmark("lm_gpu.py", *flags, timeout=600, env=env)
  assert "moe_4_lr0.01_s0_4: finished earlier" in again.stdout
  with open(results_lib.summary_path(results_dir, run)) as f:
    assert json.load(f) == summary


@pytest.mark.parametrize(
    "flags, backend, message",
    [
        (["--arrays=/nonexistent/x.npz"], "jax", "does not exist: export it"),
        ([], "tensorflow", "runs on KERAS_BACKEND=jax"),
        (["--configs=moe_7"], "jax", "no config"),
    ],
)
def test_bad_requests_are_one_line(flags, backend, message, tmp_path):
  env = dict(os.environ, KERAS_BACKEND=backend)
  result = bench_testlib.run_benchmark(
      "lm_gpu.py", "--mode=train", f"--results_dir={tmp_path}", *flags, env=env
  )
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("lm_gpu.py: ") and message in last, result.stderr


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--lrs=fast", "--lrs must be distinct positive learning rates"),
        ("--seeds=0,0", "--seeds must be distinct integers"),
    ],
)
def test_bad_seeds_and_rates_are_flag_errors(flag, message, tmp_path):
  env = dict(os.environ, KERAS_BACKEND="jax")
  result = bench_testlib.run_benchmark(
      "lm_gpu.py", "--mode=train", f"--results_dir={tmp_path}", flag, env=env
  )
  assert result.returncode == 1
  assert "Flags parsing error" in result.stderr and message in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.listdir(tmp_path)
