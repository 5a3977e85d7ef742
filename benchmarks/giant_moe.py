r"""Appendix D memory techniques on one machine: optimizer state, peak memory,
and the largest MoE language model that trains here.

Two modes.

`--mode=memory` (default): one MoE LM (default MoE-256-h of Table 8, on Penn
Treebank batches), trained for a few steps in a fresh subprocess per setting:

  adam                  keras Adam on every variable
  factored              FactoredAdam (beta_1 = 0, factored 2nd moment on the
                        expert matrices, appendix D)
  factored_recompute    FactoredAdam + recomputed expert hidden activations

and reported: parameters, optimizer-state bytes, the process's peak resident
memory (ru_maxrss of the fresh process, framework runtime included), the
increase over the built-but-untrained model, and the step time.

  python benchmarks/giant_moe.py --mode=memory

`--mode=train`: trains one large MoE LM (default MoE-1024-h of Table 8,
1.09B parameters with the PTB vocabulary) with FactoredAdam and
recomputation on Penn Treebank (gin/data/ptb.gin) for `--steps` steps and
prints the training loss (mean NLL per target word of the sampled softmax)
as it goes down.

  python benchmarks/giant_moe.py --mode=train --steps=300

Both set TF_CPU_ALLOCATOR_USE_BFC=true before TensorFlow starts (README.md:
the BFC allocator reuses the big gradient buffers instead of page-faulting
them in every step).
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

SETTINGS = ("adam", "factored", "factored_recompute")
MEMORY_GIN = ("gin/lm/news100b/moe_256_h.gin", "gin/data/ptb.gin")
TRAIN_GIN = ("gin/lm/news100b/moe_1024_h.gin", "gin/data/ptb.gin")

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "mode", "memory", ["memory", "train", "child"], "What to run."
)
flags.DEFINE_multi_string(
    "gin_file", None, "LM and data gin files (default depends on the mode)."
)
flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings.")
flags.DEFINE_list("settings", list(SETTINGS), "memory mode: settings to run.")
flags.DEFINE_string("setting", "factored_recompute", "child/train: setting.")
flags.DEFINE_integer(
    "steps", None, "Training steps (default: memory 4, train 300)."
)
flags.DEFINE_integer("batch_tokens", 8192, "PTB tokens per batch.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_integer(
    "warmup_steps", 50, "Linear warmup, then constant (train mode)."
)
flags.DEFINE_integer("log_every", 10, "train mode: log every N steps.")
flags.DEFINE_string(
    "expert_dtype", None, "Expert dtype policy, e.g. bfloat16 (None: float32)."
)
flags.DEFINE_string("output_json", None, "Also write the results here.")


def _peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _nbytes(variables):
  import keras  # pylint: disable=g-import-not-at-top

  total = 0
  for v in variables:
    size = 1
    for dim in v.shape:
      size *= int(dim)
    total += size * {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}.get(
        keras.backend.standardize_dtype(v.dtype), 4
    )
  return total


def _build(setting, gin_files, bindings, batch_tokens, expert_dtype):
  """Parses gin, builds the data, the model and the optimizer of a setting.

  Returns:
    (task, model, optimizer).
  """
  import gin  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top

  import data_pipelines  # pylint: disable=g-import-not-at-top
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top
  from moe_keras.models import blocks  # pylint: disable=g-import-not-at-top
  from moe_keras.optimizers import factored_adam  # pylint: disable=g-import-not-at-top
  from moe_keras.tasks import lm_task  # pylint: disable=g-import-not-at-top

  recompute = setting == "factored_recompute"
  bindings = list(bindings) + [
      f"lm_batching.batch_tokens = {batch_tokens}",
      f"moe_spec.recompute_expert_activations = {recompute}",
  ]
  experiment.parse_gin(list(gin_files), bindings)
  if expert_dtype:
    # The LM builder has no expert_dtype argument (yet): pass it to the
    # MoE layer the builder constructs.
    build_moe = blocks.build_moe

    def build_moe_with_dtype(spec, **kwargs):
      layer = build_moe(spec, **kwargs)
      layer.expert_dtype = keras.dtype_policies.get(expert_dtype).name
      return layer

    blocks.build_moe = build_moe_with_dtype
  task = lm_task.LmTask(data_pipelines.get_data())
  model = task.build_model()
  if setting == "adam":
    optimizer = keras.optimizers.Adam(learning_rate=FLAGS.learning_rate)
  else:
    optimizer = factored_adam.FactoredAdam(learning_rate=FLAGS.learning_rate)
  del gin
  return task, model, optimizer


def _child(setting, gin_files, steps, train_mode):
  """Runs in a fresh process: builds, trains `steps` steps, prints JSON."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  start = time.time()
  task, model, optimizer = _build(
      setting,
      gin_files,
      FLAGS.gin_bindings,
      FLAGS.batch_tokens,
      FLAGS.expert_dtype,
  )
  task.compile(model, optimizer)
  optimizer.build(model.trainable_variables)
  params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
  expert_params = sum(
      int(np.prod(w.shape))
      for w in model.trainable_weights
      if "expert_kernel" in w.path
  )
  slots = [
      v
      for v in optimizer.variables
      if not v.path.endswith(("iteration", "learning_rate"))
  ]
  result = {
      "setting": setting,
      "gin_files": list(gin_files),
      "params": params,
      "expert_params": expert_params,
      "param_bytes": _nbytes(model.trainable_weights),
      "optimizer_state_bytes": _nbytes(slots),
      "expert_optimizer_state_bytes": _nbytes(
          [v for v in slots if "expert_kernel" in v.path]
      ),
      "build_s": time.time() - start,
      "rss_built_mb": _peak_rss_mb(),
  }
  print("BUILT " + json.dumps(result), flush=True)
  # Peak bytes of live tensors in TF's BFC allocator (the RSS peak also
  # counts the allocator's pooling and fragmentation).
  try:
    tf.config.experimental.reset_memory_stats("CPU:0")
  except (ValueError, RuntimeError):
    pass
  dataset = task.train_dataset().repeat()
  warmup = max(1, FLAGS.warmup_steps)
  step_times, losses = [], []
  for step, (x, y) in enumerate(dataset.take(steps)):
    if train_mode:
      optimizer.learning_rate = FLAGS.learning_rate * min(
          1.0, (step + 1) / warmup
      )
    t0 = time.time()
    logs = model.train_on_batch(x, y, return_dict=True)
    step_times.append(time.time() - t0)
    losses.append(float(logs["loss"]))
    if train_mode and (step + 1) % FLAGS.log_every == 0:
      recent = losses[-FLAGS.log_every :]
      print(
          f"step {step + 1}: loss {np.mean(recent):.3f}"
          f" (ppl {np.exp(np.mean(recent)):.1f}),"
          f" {np.mean(step_times[-FLAGS.log_every:]):.2f} s/step,"
          f" peak RSS {_peak_rss_mb() / 1024:.2f} GB",
          flush=True,
      )
  try:
    allocated = tf.config.experimental.get_memory_info("CPU:0")["peak"]
  except (ValueError, RuntimeError):
    allocated = None
  result.update(
      {
          "peak_allocated_mb": None if allocated is None else allocated / 2**20,
          "steps": len(step_times),
          "first_step_s": step_times[0],
          "step_s": float(np.median(step_times[1:] or step_times)),
          "losses": losses,
          "peak_rss_mb": _peak_rss_mb(),
      }
  )
  result["train_increase_mb"] = result["peak_rss_mb"] - result["rss_built_mb"]
  print("RESULT " + json.dumps(result), flush=True)
  return result


def _run_child(setting, gin_files, steps):
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = os.pathsep.join([_REPO, env.get("PYTHONPATH", "")])
  cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--mode=child",
      f"--setting={setting}",
      f"--steps={steps}",
      f"--batch_tokens={FLAGS.batch_tokens}",
      f"--learning_rate={FLAGS.learning_rate}",
  ]
  cmd += [f"--gin_file={f}" for f in gin_files]
  cmd += [f"--gin_bindings={b}" for b in FLAGS.gin_bindings]
  if FLAGS.expert_dtype:
    cmd.append(f"--expert_dtype={FLAGS.expert_dtype}")
  proc = subprocess.run(
      cmd, env=env, cwd=_REPO, capture_output=True, text=True, check=False
  )
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  tail = (proc.stdout + proc.stderr)[-3000:]
  return {"setting": setting, "error": f"exit {proc.returncode}", "tail": tail}


def _memory_table(results):
  lines = [
      "| setting | params | optimizer state MB (experts) | peak RSS MB |"
      " increase over built model MB | peak allocated in training MB |"
      " s/step |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['setting']} | failed: {r['error']} | | | | | |")
      continue
    lines.append(
        f"| {r['setting']} | {r['params'] / 1e6:.1f}M |"
        f" {r['optimizer_state_bytes'] / 2**20:.1f}"
        f" ({r['expert_optimizer_state_bytes'] / 2**20:.1f}) |"
        f" {r['peak_rss_mb']:.0f} | {r['train_increase_mb']:.0f} |"
        f" {r['peak_allocated_mb'] or float('nan'):.0f} |"
        f" {r['step_s']:.2f} |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
  if FLAGS.mode == "child":
    default_gin, default_steps = MEMORY_GIN, 4
  elif FLAGS.mode == "train":
    default_gin, default_steps = TRAIN_GIN, 300
  else:
    default_gin, default_steps = MEMORY_GIN, 4
  gin_files = FLAGS.gin_file or list(default_gin)
  steps = FLAGS.steps or default_steps
  if FLAGS.mode == "child":
    _child(FLAGS.setting, gin_files, steps, train_mode=False)
    return
  if FLAGS.mode == "train":
    result = _child(FLAGS.setting, gin_files, steps, train_mode=True)
    losses = result["losses"]
    window = max(1, min(FLAGS.log_every, len(losses) // 2))
    first = sum(losses[:window]) / window
    last = sum(losses[-window:]) / window
    print(
        f"{result['params'] / 1e9:.3f}B parameters"
        f" ({result['expert_params'] / 1e9:.3f}B in experts);"
        f" loss {first:.3f} -> {last:.3f} over {result['steps']} steps;"
        f" median {result['step_s']:.2f} s/step; peak RSS"
        f" {result['peak_rss_mb'] / 1024:.2f} GB"
    )
    results = [result]
  else:
    results = []
    for setting in FLAGS.settings:
      if setting not in SETTINGS:
        raise app.UsageError(f"unknown setting {setting!r}")
      results.append(_run_child(setting, gin_files, steps))
      print(json.dumps({k: v for k, v in results[-1].items() if k != "losses"}))
    print(_memory_table(results))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
