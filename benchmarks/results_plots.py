"""Results plots: learning curves and margins as PNG files.

Dev perplexity against training tokens and wall clock, one line per config
(mean over seeds, range shaded; `plot_curves`), and each config's dev margin
against the baseline by seed pair (`plot_margins`), for the rows
`results_tables` collects. matplotlib is imported only when a plot is drawn.
Each PNG records the configs it shows, and a table does not replace a PNG
that shows configs it lacks (`check_plot_conflicts`, `--plot_tag`).
"""

import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_tables  # pylint: disable=g-import-not-at-top,wrong-import-position
from moe_keras import atomic_file  # pylint: disable=g-import-not-at-top,wrong-import-position

# The front ends' --mode values that write the plots: those that cover the
# whole table. A --mode=grid or --mode=sweep run is often one lane of some
# configs (README "Results"), and its plots would replace the whole table's
# with those configs alone; --mode=speed trains no table run.
PLOT_MODES = ("all", "table")

# --plot_tag values: they become part of file names.
PLOT_TAG_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"
# The PNG text chunk that records which configs a plot shows (the grid's
# table or sweep configs), so that a table of other configs does not
# silently replace it (`check_plot_conflicts`).
CONFIGS_METADATA_KEY = "moe_keras configs"


class PlotConflict(ValueError):
  """A PNG to write shows configs this table lacks (one-line message)."""


def write_grid_plots(
    rows: List[results_tables.Row],
    swept: List[results_tables.Row],
    grid: results_lib.Grid,
    mode: str,
) -> str:
  """`write_plots` for the grid's sweep and table in `PLOT_MODES`.

  Args:
    rows: the table's rows (`results_tables.collect_rows`).
    swept: the sweep's rows (`results_tables.sweep_rows`).
    grid: the front end's grid.
    mode: the front end's --mode.

  Returns:
    The line to print: the written PNGs' paths, or why none were written
    (the mode, or a `PlotConflict`).
  """
  if mode not in PLOT_MODES:
    return (
        f"plots: not written by --mode={mode} (it may run some of the"
        " table's configs); --mode=table writes them for the whole table"
    )
  try:
    written = write_plots(
        rows,
        swept,
        grid.results_dir,
        grid.corpus.name,
        grid.steps,
        sweep_steps=grid.sweep_steps,
        grid_lr=grid.grid_lr,
        configs=grid.configs,
        sweep_configs=grid.sweep_configs,
        tag=grid.plot_tag,
    )
  except PlotConflict as e:
    return f"plots: not written: {e}"
  return "plots: " + ", ".join(written)


def _pyplot():
  """matplotlib.pyplot on the file-only Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _banded_line(ax, xs, mid, low, high, label):
  """One line with its [low, high] band shaded in the line's colour."""
  (line,) = ax.plot(xs, mid, marker="o", ms=3, label=label)
  ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)


def _finish_plot(plt, fig, ax, path, title, xlabel, ylabel, configs):
  """Labels, grid, legend (when there are lines); writes `path`.

  The PNG records `configs` (`CONFIGS_METADATA_KEY`, `recorded_configs`).
  """
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  metadata = {CONFIGS_METADATA_KEY: ",".join(configs)}
  atomic_file.write_atomic(
      path, lambda tmp: fig.savefig(tmp, dpi=110, metadata=metadata)
  )
  plt.close(fig)


def plot_margins(
    rows: List[results_tables.Row],
    path: str,
    title: str,
    configs: List[str],
) -> List[str]:
  """Writes a PNG of each row's paired margin vs rows[0] against tokens.

  One line per row (`results_tables.paired_margins`, the seeds' range shaded) and the zero
  line: below zero the row has the lower (better) dev perplexity. The trend
  with training tokens that a final number hides.

  Args:
    rows: the table's rows; rows[0] is the baseline.
    path: the PNG to write.
    title: its title.
    configs: the configs the PNG records (`recorded_configs`).

  Returns:
    [path], or [] when no row shares a seed with the baseline.
  """
  if not rows:
    return []
  reference = rows[0]
  margins = [
      (row, results_tables.paired_margins(row, reference)) for row in rows[1:]
  ]
  margins = [(row, m) for row, m in margins if m]
  if not margins:
    return []
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row, points in margins:
    _banded_line(
        ax,
        [p["tokens"] / 1e6 for p in points],
        [p["margin"] for p in points],
        [p["low"] for p in points],
        [p["high"] for p in points],
        label=f"{row.config} (seeds paired: {points[0]['seeds']})",
    )
  ax.axhline(0.0, color="black", lw=0.8)
  _finish_plot(
      plt,
      fig,
      ax,
      path,
      title,
      "training tokens (millions)",
      f"dev perplexity vs {reference.config} (%)",
      configs,
  )
  return [path]


def curve_paths(path_prefix: str) -> List[str]:
  """The PNGs `plot_curves` writes: against tokens, against wall clock."""
  return [f"{path_prefix}_tokens.png", f"{path_prefix}_wallclock.png"]


def plot_curves(
    rows: List[results_tables.Row],
    path_prefix: str,
    title: str,
    configs: List[str],
) -> List[str]:
  """Writes `curve_paths(path_prefix)` (tokens, wall clock); returns them.

  Args:
    rows: one line each (mean over seeds, range shaded).
    path_prefix: the PNGs' path without `_tokens.png` / `_wallclock.png`.
    title: their title.
    configs: the configs the PNGs record (`recorded_configs`).
  """
  written = []
  if not any(row.summaries for row in rows):
    return written
  plt = _pyplot()
  for path, key, label, scale in zip(
      curve_paths(path_prefix),
      ("tokens", "train_seconds"),
      ("training tokens (millions)", "training wall clock (minutes)"),
      (1e6, 60.0),
  ):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
      curve = results_tables.mean_curve(row.summaries)
      if curve:
        _banded_line(
            ax,
            [p[key] / scale for p in curve],
            [p["dev_perplexity"] for p in curve],
            [p["dev_min"] for p in curve],
            [p["dev_max"] for p in curve],
            label=f"{row.config} (n={len(row.summaries)})",
        )
    ax.set_yscale("log")
    _finish_plot(
        plt,
        fig,
        ax,
        path,
        title,
        label,
        "dev perplexity (exact softmax)",
        configs,
    )
    written.append(path)
  return written


def plot_names(steps, sweep_steps=None, grid_lr=None, tag=None):
  """The PNG names of a sweep of `sweep_steps` and a table of `steps`.

  Every name carries the lengths it shows, so a longer sweep or table does
  not replace a shorter one's plots: `curves_sweep_<S>steps_*.png` (the
  sweep), `curves_<N>steps_*.png` and `margins_<N>steps_tokens.png` (the
  table at the rates its own length's sweep chose), with `_sweep<S>` after
  `<N>steps` when the table takes the rates of a sweep of S != N steps, or
  `_lr<rate>` when every row runs at one given rate (`--grid_lr`), and
  `_<tag>` last (`--plot_tag`) in all three.

  Args:
    steps: the table's runs' steps N.
    sweep_steps: the sweep runs' steps S (None: N).
    grid_lr: None, or the one rate of every row.
    tag: None, or a name matching `PLOT_TAG_PATTERN`.

  Returns:
    {"sweep": prefix, "curves": prefix, "margins": file name}; the curve
    prefixes get `_tokens.png` / `_wallclock.png` (`plot_curves`).
  """
  sweep_steps = sweep_steps or steps
  table = f"{steps}steps"
  if grid_lr is not None:
    table += f"_lr{grid_lr:g}"
  elif sweep_steps != steps:
    table += f"_sweep{sweep_steps}"
  suffix = "" if tag is None else f"_{tag}"
  return {
      "sweep": f"curves_sweep_{sweep_steps}steps{suffix}",
      "curves": f"curves_{table}{suffix}",
      "margins": f"margins_{table}{suffix}_tokens.png",
  }


def recorded_configs(path: str) -> Optional[List[str]]:
  """The configs a PNG of `_finish_plot` records, or None (no file, no record).

  Args:
    path: a PNG.

  Returns:
    The `CONFIGS_METADATA_KEY` text split at commas; None when the file does
    not exist, is not an image PIL reads (e.g. cut short), or has no such
    text (e.g. written before the key existed): such a file is replaced.
  """
  if not os.path.exists(path):
    return None
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      text = getattr(image, "text", {}).get(CONFIGS_METADATA_KEY)
  except OSError:  # PIL.UnidentifiedImageError, a truncated file
    return None
  return None if text is None else text.split(",")


def _display_path(path: str) -> str:
  """`path` relative to the repository when inside it, else as given."""
  relative = os.path.relpath(path, results_lib.REPO)
  return path if relative.startswith(os.pardir) else relative


def check_plot_conflicts(planned: Dict[str, List[str]]) -> None:
  """Raises PlotConflict when a PNG to write shows configs the plan lacks.

  A PNG may be replaced by one that shows the configs it records or more
  (the same table again, more of its runs finished, or the whole table
  after one lane of it), not by one that would drop some (a table of other
  configs at the same lengths and rate, e.g. one lane of a larger table).

  Args:
    planned: {PNG path: the configs it will record}.

  Raises:
    PlotConflict: an existing PNG records a config missing from its plan;
      the message names the PNG, both lists and --plot_tag.
  """
  for path, configs in planned.items():
    recorded = recorded_configs(path)
    if recorded is None:
      continue
    missing = [c for c in recorded if c not in configs]
    if missing:
      raise PlotConflict(
          f"{_display_path(path)} shows configs {','.join(recorded)}, and"
          f" this table's ({','.join(configs)}) lack {','.join(missing)}:"
          " --plot_tag=NAME writes its plots beside it"
      )


def write_plots(
    rows,
    swept,
    results_dir,
    corpus_name,
    steps,
    sweep_steps=None,
    grid_lr=None,
    configs=None,
    sweep_configs=None,
    tag=None,
):
  """The sweep's and the table's curve PNGs and the table's margin PNG.

  The sweep's only when its finished runs span two or more rates
  (`results_tables.swept_rates`). Each PNG records the configs it shows
  (the table's, or the sweep's); nothing is written when an existing PNG of
  the same name shows configs that these lack (`check_plot_conflicts`).

  Args:
    rows: the table's rows (`results_tables.collect_rows`).
    swept: the sweep's rows (`results_tables.sweep_rows`).
    results_dir: where the PNGs go.
    corpus_name: for the titles.
    steps: the table's runs' steps.
    sweep_steps: the sweep runs' steps (None: `steps`). The PNGs are
      named by both lengths (`plot_names`), so sweeps and tables of other
      lengths in one results_dir keep their own plots.
    grid_lr: None, or the one rate of every row (`--grid_lr`; in the
      table's names).
    configs: the table's configs (None: the rows'), recorded in its PNGs.
    sweep_configs: the swept configs (None: those of `swept`, in order),
      recorded in the sweep's PNGs.
    tag: None, or `--plot_tag` (in every name).

  Returns:
    The written PNGs' paths relative to the repository.

  Raises:
    PlotConflict: see above.
  """
  names = plot_names(steps, sweep_steps, grid_lr, tag)
  sweep_steps = sweep_steps or steps
  configs = list(configs) if configs is not None else [r.config for r in rows]
  if sweep_configs is None:
    sweep_configs = list(dict.fromkeys(row.config for row in swept))
  draw_sweep = len(results_tables.swept_rates(swept)) > 1
  planned = {}
  if draw_sweep:
    for path in curve_paths(os.path.join(results_dir, names["sweep"])):
      planned[path] = sweep_configs
  for path in curve_paths(os.path.join(results_dir, names["curves"])):
    planned[path] = configs
  planned[os.path.join(results_dir, names["margins"])] = configs
  check_plot_conflicts(planned)
  plots = []
  if draw_sweep:
    plots += plot_curves(
        [
            results_tables.Row(
                f"{row.config} lr {row.lr:g}", row.lr, row.summaries
            )
            for row in swept
        ],
        os.path.join(results_dir, names["sweep"]),
        f"{corpus_name}: dev perplexity of the rate sweep (seed"
        f" {results_lib.SWEEP_SEED}, {sweep_steps} steps)",
        configs=sweep_configs,
    )
  plots += plot_curves(
      rows,
      os.path.join(results_dir, names["curves"]),
      f"{corpus_name}: dev perplexity, mean over seeds (range shaded),"
      f" {steps} steps",
      configs=configs,
  )
  plots += plot_margins(
      rows,
      os.path.join(results_dir, names["margins"]),
      f"{corpus_name}: margin vs {rows[0].config} by seed pair (range"
      f" shaded), {steps} steps",
      configs=configs,
  )
  return [os.path.relpath(p, results_lib.REPO) for p in plots]
