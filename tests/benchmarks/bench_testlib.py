"""Shared by the benchmark tests: run a benchmarks/ script in a fresh process,
and write the run summaries the results tables read."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
sys.path.insert(0, REPO)

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_benchmark(script, *flags, timeout=300, env=None):
  """Runs benchmarks/`script` with `flags` under this interpreter.

  Args:
    script: file name under benchmarks/, e.g. "moe_layer.py".
    *flags: its command-line flags.
    timeout: seconds before the run is killed (subprocess.TimeoutExpired).
    env: the process's environment (None: this one's).

  Returns:
    subprocess.CompletedProcess with text stdout and stderr; the return code
    is not checked.
  """
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", script)] + list(flags),
      capture_output=True,
      text=True,
      check=False,
      timeout=timeout,
      env=env,
  )


def curve(points):
  """A summary's learning curve from (step, tokens, seconds, dev ppl) tuples."""
  return [
      {"step": s, "tokens": t, "train_seconds": w, "dev_perplexity": p}
      for s, t, w, p in points
  ]


def write_summary(
    results_dir,
    run,
    final_dev,
    test_ppl,
    curve=None,  # pylint: disable=redefined-outer-name
    seconds=60.0,
    tokens=1e6,
):
  """Writes `run`'s summary under `results_dir` as a finished run would.

  Args:
    results_dir: the results directory (its runs/ subdirectory is made).
    run: a `results_lib.Run`.
    final_dev: its final dev perplexity.
    test_ppl: its test perplexity.
    curve: its learning curve (`curve`), or None for none.
    seconds: its training wall clock.
    tokens: its training tokens.
  """
  path = results_lib.summary_path(results_dir, run)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(
        {
            "run_id": run.run_id,
            "config": run.config,
            "lr": run.lr,
            "seed": run.seed,
            "steps": run.steps,
            "tokens": tokens,
            "train_seconds": seconds,
            "final_dev_perplexity": final_dev,
            "test": {"perplexity": test_ppl},
            "curve": curve or [],
        },
        f,
    )
