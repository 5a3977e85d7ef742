"""results_flags: the front ends' grid from their flags, and one-line errors."""

import os
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, REPO)

from benchmarks import results_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def _grid_flags(**overrides):
  values = dict(
      corpus="debian_docs",
      configs=["4xlstm_128", "moe_256@nobalance"],
      sweep_configs=None,
      seeds=["0", "2"],
      lrs=["1e-3", "4e-3"],
      train_steps=50,
      sweep_steps=None,
      output_dir=None,
      results_dir=None,
      grid_lr=None,
      plot_tag=None,
  )
  values.update(overrides)
  return types.SimpleNamespace(**values)


_DOCS = {
    "debian_docs": results_lib.Corpus(
        name="debian_docs",
        gin_dir="gin/lm/debian_docs",
        data_seed_binding="lm_batching.seed",
    )
}


@pytest.mark.parametrize(
    "task, sweep_variants, swept",
    [
        ("lm", False, ["4xlstm_128"]),
        ("mt", True, ["4xlstm_128", "moe_256@nobalance"]),
    ],
)
def test_grid_from_flags_defaults(task, sweep_variants, swept):
  grid = results_flags.grid_from_flags(
      _grid_flags(), _DOCS, task=task, sweep_variants=sweep_variants
  )
  assert grid.configs == ["4xlstm_128", "moe_256@nobalance"]
  assert grid.sweep_configs == swept
  assert grid.seeds == [0, 2]
  assert grid.lrs == [1e-3, 4e-3]
  assert (grid.steps, grid.sweep_steps, grid.grid_lr) == (50, 50, None)
  assert grid.plot_tag is None
  assert grid.output_dir == os.path.join(
      os.path.expanduser("~"), "moe_keras_runs", f"{task}_debian_docs"
  )
  assert grid.results_dir == os.path.join(
      REPO, "results", f"{task}_debian_docs"
  )


def test_grid_from_flags_takes_explicit_values_and_checks_configs(tmp_path):
  grid = results_flags.grid_from_flags(
      _grid_flags(
          sweep_configs=["moe_32"],
          sweep_steps=20,
          output_dir="~/elsewhere",
          results_dir=str(tmp_path),
          grid_lr=2e-3,
          plot_tag="ptb_rows",
      ),
      _DOCS,
      task="lm",
      sweep_variants=False,
  )
  assert (grid.sweep_configs, grid.sweep_steps) == (["moe_32"], 20)
  assert grid.output_dir == os.path.join(os.path.expanduser("~"), "elsewhere")
  assert (grid.results_dir, grid.grid_lr) == (str(tmp_path), 2e-3)
  assert grid.plot_tag == "ptb_rows"
  for bad in (
      {"configs": ["4xlstm_128", "nope"]},
      {"sweep_configs": ["moe_32@fast"]},
  ):
    with pytest.raises(results_lib.GridError):
      results_flags.grid_from_flags(
          _grid_flags(**bad), _DOCS, task="lm", sweep_variants=False
      )


def test_a_results_or_output_dir_that_is_a_file_is_refused(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory\n")
  for name in ("results_dir", "output_dir"):
    with pytest.raises(
        results_lib.GridError,
        match=f"--{name}=.*a_file exists and is not a directory",
    ):
      results_flags.grid_from_flags(
          _grid_flags(**{name: str(a_file)}),
          _DOCS,
          task="lm",
          sweep_variants=False,
      )
  assert a_file.read_text() == "not a directory\n"


def test_run_main_turns_a_grid_error_into_one_line():
  def failing():
    raise results_lib.GridError("no chosen rate for ['dense']")

  with pytest.raises(SystemExit) as exit_info:
    results_flags.run_main(failing, "lm_results.py")
  assert exit_info.value.code == (
      "lm_results.py: error: no chosen rate for ['dense']"
  )


def test_execute_in_grid_passes_the_grids_dirs_and_the_flags(monkeypatch):
  calls = []
  monkeypatch.setattr(
      results_lib,
      "execute",
      lambda corpus, run, **kwargs: calls.append((corpus, run, kwargs)),
  )
  grid = results_flags.grid_from_flags(
      _grid_flags(output_dir="/m", results_dir="/r"),
      _DOCS,
      task="lm",
      sweep_variants=False,
  )
  run = results_lib.Run("moe_32", 1e-3, 0, 50)
  flag_values = types.SimpleNamespace(
      steps_per_eval=25, gin_bindings=["MODEL_DIM = 32"], continue_from=10
  )
  summarize = lambda result: result
  results_flags.execute_in_grid(
      grid, run, flag_values, eval_flags=["--plot"], summarize=summarize
  )
  assert calls == [
      (
          _DOCS["debian_docs"],
          run,
          dict(
              output_dir="/m",
              results_dir="/r",
              steps_per_eval=25,
              eval_flags=["--plot"],
              summarize=summarize,
              extra_bindings=["MODEL_DIM = 32"],
              continue_from=10,
          ),
      )
  ]
