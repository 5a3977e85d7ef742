"""Results statistics and tables: what the front ends print.

Over the summaries `results_lib` writes (one JSON per run): mean, sample
standard deviation and range over seeds, differences to a reference and
whether they exceed twice the larger spread (`results_table`), the same seed
by seed (`paired_table`), the margin along training (`margin_table`) and its
fitted trend in log2(tokens) (`margin_trend_table`), tokens and wall clock
to the baseline's final dev perplexity (`time_to_quality_table`), and the
rate sweep and rate-grid reports. Plots: `results_plots`.
"""

import collections
import dataclasses
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import results_step_time  # pylint: disable=g-import-not-at-top,wrong-import-position

# -- statistics ------------------------------------------------------------


def mean_std(values: Sequence[float]):
  """(mean, sample standard deviation; 0 for one value)."""
  values = [float(v) for v in values]
  if not values:
    return float("nan"), float("nan")
  return (
      statistics.fmean(values),
      statistics.stdev(values) if len(values) > 1 else 0.0,
  )


def first_crossing(curve, target, key):
  """`key` (tokens or train_seconds) where dev perplexity first <= target.

  Linear interpolation between the two curve points around the crossing;
  None when the curve never reaches the target.
  """
  previous = None
  for point in curve:
    ppl = point.get("dev_perplexity")
    if ppl is None:
      continue
    if ppl <= target:
      if previous is None or previous[1] == ppl:
        return point[key]
      x0, y0 = previous
      frac = (y0 - target) / (y0 - ppl)
      return x0 + frac * (point[key] - x0)
    previous = (point[key], ppl)
  return None


@dataclasses.dataclass
class Row:
  """One config's runs at its table rate, and the numbers the table shows."""

  config: str
  lr: Optional[float]
  summaries: List[dict]

  def metric(self, name):
    return [s["test"][name] for s in self.summaries]

  def field(self, name):
    return [s[name] for s in self.summaries]


def collect_rows(results_dir, configs, seeds, steps, lrs) -> List[Row]:
  rows = []
  for config in configs:
    lr = lrs.get(config)
    summaries = [
        s
        for s in (
            results_lib.load_summary(
                results_dir, results_lib.Run(config, lr, seed, steps)
            )
            for seed in seeds
        )
        if s is not None
    ]
    rows.append(Row(config, lr, summaries))
  return rows


def rate_grid_rows(results_dir, configs, lrs, seeds, steps) -> List[Row]:
  """One Row per (config, rate) of a grid run at several rates.

  Args:
    results_dir: where the run summaries are.
    configs: the configs, in table order.
    lrs: the rates every config was run at (e.g. the two rates a sweep seed
      could not separate).
    seeds: the grid's seeds.
    steps: the runs' steps.

  Returns:
    Rows config-major (each config's rates in `lrs` order), each with the
    summaries of the seeds that finished (none: an empty row, which the
    tables print as missing).
  """
  return [
      collect_rows(results_dir, [config], seeds, steps, {config: lr})[0]
      for config in configs
      for lr in lrs
  ]


def dev_chosen_rows(rows: List[Row], seeds) -> Tuple[List[Row], List[str]]:
  """Each config's row at its rate of lowest mean final dev perplexity.

  Only rows with every seed of `seeds` compete, so a rate is never chosen
  on fewer seeds than another. The choice looks at dev perplexity only;
  the test metrics of the chosen rows are what a table of them reports
  (dev selects, test reports).

  Args:
    rows: `rate_grid_rows`' rows.
    seeds: the seeds a competing row must have.

  Returns:
    (the chosen rows in config order, the configs with no complete row).
  """
  wanted = set(int(s) for s in seeds)
  chosen, incomplete = [], []
  for config in dict.fromkeys(r.config for r in rows):
    complete = [
        r
        for r in rows
        if r.config == config and {s["seed"] for s in r.summaries} >= wanted
    ]
    if not complete:
      incomplete.append(config)
      continue
    chosen.append(
        min(
            complete,
            key=lambda r: mean_std(r.field("final_dev_perplexity"))[0],
        )
    )
  return chosen, incomplete


def rate_grid_report(
    results_dir,
    configs,
    lrs,
    seeds,
    steps,
    metrics: Sequence[str],
    second_reference: Optional[str] = None,
) -> str:
  """Markdown: every config at every rate of `lrs`, then each at its best.

  The front ends' `--table_lrs`: when one sweep seed's choice of rate is in
  doubt (e.g. the dense model's best rate changes with the seed), every
  config runs at each candidate rate on the grid seeds (`--grid_lr`, once
  per rate) and this compares them as a user would tune them: per config,
  the rate of lowest mean final dev perplexity over those seeds
  (`dev_chosen_rows`), then the chosen rows' test metrics, unpaired
  (`results_table`) and seed by seed (`paired_table`).

  Args:
    results_dir, configs, lrs, seeds, steps: as `rate_grid_rows`.
    metrics: the test metrics to tabulate.
    second_reference: as `results_table`.

  Returns:
    The report's markdown (headings and tables).
  """
  grid = rate_grid_rows(results_dir, configs, lrs, seeds, steps)
  chosen, incomplete = dev_chosen_rows(grid, seeds)
  rates = ", ".join(f"{lr:g}" for lr in lrs)
  parts = []
  for metric in metrics:
    parts.append(
        f"## Every config at rates {rates}: test {metric}, seeds"
        f" {list(seeds)}, {steps} steps (baseline: the first row)"
    )
    parts.append(results_table(grid, metric, second_reference))
  if incomplete:
    parts.append(
        f"No rate has all seeds {list(seeds)} for: {', '.join(incomplete)}"
        " (left out below)."
    )
  if chosen:
    choice = ", ".join(f"{r.config} {r.lr:g}" for r in chosen)
    for metric in metrics:
      parts.append(
          f"## Each config at its rate of lowest mean final dev perplexity"
          f" ({choice}): test {metric}"
      )
      parts.append(results_table(chosen, metric, second_reference))
      parts.append(f"Seed by seed (same data order), test {metric}:")
      parts.append(paired_table(chosen, metric))
  return "\n\n".join(parts)


def print_table_lrs_report(
    flag_values, results_dir, configs, seeds, steps, metrics, second_reference
) -> None:
  """--table_lrs of the front ends: prints `rate_grid_report` when it is set.

  Args:
    flag_values: the front end's flags (table_lrs).
    results_dir, configs, seeds, steps, metrics, second_reference: as
      `rate_grid_report`.
  """
  if not flag_values.table_lrs:
    return
  print()
  print(
      rate_grid_report(
          results_dir,
          configs,
          [float(x) for x in flag_values.table_lrs],
          seeds,
          steps,
          metrics=metrics,
          second_reference=second_reference,
      )
  )


def swept_rates(swept: List[Row]) -> List[float]:
  """The distinct rates of `sweep_rows`' rows, in their order.

  A sweep is shown (table, plot, per-rate margins) only when this holds two
  or more rates: with `--grid_lr`, a table's seed-`SWEEP_SEED` runs at one
  rate and the sweep's length are found like sweep runs, but compare no
  rates.
  """
  return list(dict.fromkeys(row.lr for row in swept))


def sweep_rows(results_dir, configs, lrs, steps) -> List[Row]:
  """One Row per swept (config, rate) that finished.

  The one loader of the sweep's summaries: a front end loads them once and
  passes the rows to the sweep's table (`sweep_section`), its per-rate
  margins (`sweep_margin_sections`) and its plot
  (`results_plots.write_plots`).

  Returns:
    Rows in `lrs` order, then `configs` order; each row's `config` is the
    plain config name and `lr` its rate, one seed-`SWEEP_SEED` summary.
  """
  rows = []
  for run in results_lib.sweep_runs(configs, lrs, steps):
    summary = results_lib.load_summary(results_dir, run)
    if summary is not None:
      rows.append(Row(run.config, run.lr, [summary]))
  return rows


def sweep_section(swept: List[Row], configs, lrs, steps) -> str:
  """Markdown: a heading and `sweep_table`, or one line when no sweep.

  Args:
    swept: `sweep_rows` of `configs` at `lrs` and `steps`.
    configs: the swept configs (the table's rows).
    lrs: the swept rates (its columns).
    steps: the sweep runs' steps (for the heading).

  Returns:
    The section; "no rate sweep at N steps ..." when the finished sweep
    runs span fewer than two rates (`swept_rates`).
  """
  heading = (
      f"## Learning-rate sweep (seed {results_lib.SWEEP_SEED}, {steps}"
      " steps, final dev perplexity)"
  )
  if len(swept_rates(swept)) < 2:
    return (
        f"{heading}\nno rate sweep at {steps} steps: the finished seed"
        f" {results_lib.SWEEP_SEED} runs span fewer than two rates."
    )
  return heading + "\n" + sweep_table(swept, configs, lrs)


def sweep_table(swept: List[Row], configs, lrs) -> str:
  """Markdown: final dev perplexity per config (rows) and rate (columns).

  Args:
    swept: `sweep_rows` of `configs` at `lrs`.
    configs: the table's rows.
    lrs: its columns.

  Returns:
    The table; "-" where a run is missing, and a "chosen" column with the
    rate `results_lib.lowest_dev_rates` chooses (the grid's rule).
  """
  lines = [
      "| config | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
      "|---|" + "---:|" * (len(lrs) + 1),
  ]
  dev = {
      (row.config, row.lr): row.summaries[0]["final_dev_perplexity"]
      for row in swept
  }
  choice = results_lib.lowest_dev_rates(dev, configs, lrs)
  for config in configs:
    cells = []
    for lr in lrs:
      ppl = dev.get((config, lr))
      cells.append("-" if ppl is None else f"{ppl:.2f}")
    chosen = choice.get(config)
    lines.append(
        f"| {config} | "
        + " | ".join(cells)
        + f" | {'-' if chosen is None else f'{chosen:g}'} |"
    )
  return "\n".join(lines)


def sweep_margin_sections(swept: List[Row], baseline: str) -> List[str]:
  """Markdown: per swept rate, each config's dev margin vs the baseline.

  Args:
    swept: `sweep_rows`.
    baseline: the config every margin is against.

  Returns:
    One "Sweep, lr R, seed S:" heading plus `margin_table` per rate at which
    the baseline and at least one other config finished; none when the
    sweep spans fewer than two rates (`swept_rates`).
  """
  rates = swept_rates(swept)
  if len(rates) < 2:
    return []
  sections = []
  for lr in rates:
    at_rate = [row for row in swept if row.lr == lr]
    if len(at_rate) > 1 and at_rate[0].config == baseline:
      sections.append(
          f"Sweep, lr {lr:g}, seed {results_lib.SWEEP_SEED}:\n"
          + margin_table(at_rate, at_rate[0])
      )
  return sections


def _versus(row: Row, reference: Row, metric: str):
  """(change of row's mean vs reference's in %, |diff| > 2x the larger std).

  The second is "n<2" unless both rows have 2+ seeds: one seed has no
  spread, and its std of 0 would call any difference significant.
  """
  if row is reference or not reference.summaries:
    return "-", "-"
  values, ref_values = row.metric(metric), reference.metric(metric)
  mean, std = mean_std(values)
  ref_mean, ref_std = mean_std(ref_values)
  change = 100.0 * (mean - ref_mean) / ref_mean
  if min(len(values), len(ref_values)) < 2:
    return f"{change:+.1f}%", "n<2"
  significant = "yes" if abs(mean - ref_mean) > 2 * max(std, ref_std) else "no"
  return f"{change:+.1f}%", significant


def results_table(
    rows: List[Row], metric: str, second_reference: Optional[str] = None
) -> str:
  """Markdown table: metric over seeds, the difference to rows[0], budget.

  Args:
    rows: the table's rows; rows[0] is the baseline.
    metric: the summaries' test metric to tabulate.
    second_reference: a config among rows (e.g. the LM's moe_4, which has
      the MoE models' architecture with every expert always used) that gets
      its own difference and significance columns; None for none.

  Returns:
    The markdown table.
  """
  base = rows[0]
  second = next((r for r in rows if r.config == second_reference), None)
  extra_head = extra_rule = ""
  if second is not None:
    extra_head = f" vs {second.config} | > 2x std |"
    extra_rule = "---:|---|"
  lines = [
      f"| config | lr | seeds | test {metric} mean | std | min-max |"
      " vs baseline | > 2x std |" + extra_head + " dev ppl | steps | tokens |"
      " train wall clock |",
      "|---|---:|---:|---:|---:|---:|---:|---|"
      + extra_rule
      + "---:|---:|---:|---:|",
  ]
  for row in rows:
    if not row.summaries:
      lines.append(
          f"| {row.config} | - | 0 |" + " - |" * (9 + 2 * (second is not None))
      )
      continue
    values = row.metric(metric)
    mean, std = mean_std(values)
    versus, significant = _versus(row, base, metric)
    extra = ""
    if second is not None:
      extra = " {} | {} |".format(*_versus(row, second, metric))
    dev, _ = mean_std(
        [v for v in row.field("final_dev_perplexity") if v is not None]
    )
    tokens, _ = mean_std(row.field("tokens"))
    seconds, seconds_std = mean_std(row.field("train_seconds"))
    lr = "default" if row.lr is None else f"{row.lr:g}"
    lines.append(
        f"| {row.config} | {lr} | {len(values)} | {mean:.2f} | {std:.2f} |"
        f" {min(values):.2f}-{max(values):.2f} | {versus} | {significant} |"
        f"{extra} {dev:.2f} | {row.summaries[0]['steps']} |"
        f" {tokens / 1e6:.2f}M | {seconds / 60:.1f} +- {seconds_std / 60:.1f}"
        " min |"
    )
  return "\n".join(lines)


def paired_table(rows: List[Row], metric: str) -> str:
  """Markdown: each row against rows[0] seed by seed (same data order).

  A grid run's seed sets both its initialization and its data order
  (`Corpus.data_seed_binding`), so the baseline's and a row's runs of one
  seed saw the same batches in the same order; the per-seed difference
  leaves out the data-order part of the spread that `results_table`'s
  unpaired comparison carries. Only seeds both rows have are used.

  Args:
    rows: the table's rows; rows[0] is the baseline.
    metric: the summaries' test metric.

  Returns:
    The markdown table: per-seed relative differences, their mean and
    sample std, "> 2x std" (|mean| > 2x the std of the differences; "n<2"
    with fewer than two pairs) and whether every pair has the same sign.
  """
  base = rows[0]
  base_by_seed = {s["seed"]: s["test"][metric] for s in base.summaries}
  lines = [
      f"| vs {base.config} | pairs | per-seed change of test {metric} |"
      " mean | std | > 2x std | same sign |",
      "|---|---:|---|---:|---:|---|---|",
  ]
  for row in rows[1:]:
    changes = [
        (s["seed"], 100.0 * (s["test"][metric] / base_by_seed[s["seed"]] - 1))
        for s in row.summaries
        if base_by_seed.get(s["seed"])
    ]
    if not changes:
      lines.append(f"| {row.config} | 0 | - | - | - | - | - |")
      continue
    values = [c for _, c in changes]
    mean, std = mean_std(values)
    if len(values) < 2:
      significant = "n<2"
    else:
      significant = "yes" if abs(mean) > 2 * std else "no"
    same_sign = (
        "yes"
        if all(v < 0 for v in values) or all(v > 0 for v in values)
        else "no"
    )
    per_seed = ", ".join(f"s{seed} {c:+.1f}%" for seed, c in changes)
    lines.append(
        f"| {row.config} | {len(values)} | {per_seed} | {mean:+.1f}% |"
        f" {std:.1f} | {significant} | {same_sign} |"
    )
  return "\n".join(lines)


def mean_curve(summaries: List[dict]) -> List[dict]:
  """The seeds' curves averaged point by point (steps all seeds validated)."""
  if not summaries:
    return []
  steps = sorted(
      set.intersection(
          *[
              {p["step"] for p in s["curve"] if p.get("dev_perplexity")}
              for s in summaries
          ]
      )
  )
  curve = []
  for step in steps:
    points = [
        next(p for p in s["curve"] if p["step"] == step) for s in summaries
    ]
    curve.append(
        {
            "step": step,
            "tokens": statistics.fmean(p["tokens"] for p in points),
            "train_seconds": statistics.fmean(
                p["train_seconds"] for p in points
            ),
            "dev_perplexity": statistics.fmean(
                p["dev_perplexity"] for p in points
            ),
            "dev_min": min(p["dev_perplexity"] for p in points),
            "dev_max": max(p["dev_perplexity"] for p in points),
        }
    )
  return curve


def margin_table(rows: List[Row], reference: Row) -> str:
  """Markdown: each row's dev perplexity vs reference's along the curve.

  The margin as training proceeds, the trend a single final number hides:
  whether a model's advantage grows or shrinks with training tokens. Mean
  curves over each row's seeds (`mean_curve`), at the steps where both
  validated.

  Args:
    rows: the rows compared (reference itself is skipped).
    reference: the row every margin is against.

  Returns:
    The markdown table; a cell is 100 * (ppl / reference ppl - 1), so a
    negative margin means lower (better) perplexity than the reference.
  """
  ref_curve = {p["step"]: p for p in mean_curve(reference.summaries)}
  if not ref_curve:
    return f"(no {reference.config} runs yet)"
  curves = {
      row.config: {p["step"]: p for p in mean_curve(row.summaries)}
      for row in rows
      if row is not reference and row.summaries
  }
  steps = sorted(
      step for step in ref_curve if any(step in c for c in curves.values())
  )
  lines = [
      f"| dev ppl vs {reference.config} (n={len(reference.summaries)}) | "
      + " | ".join(
          f"step {s} ({ref_curve[s]['tokens'] / 1e6:.1f}M tok)" for s in steps
      )
      + " |",
      "|---|" + "---:|" * len(steps),
  ]
  for config, curve in curves.items():
    cells = []
    for step in steps:
      if step not in curve:
        cells.append("-")
        continue
      ratio = curve[step]["dev_perplexity"] / ref_curve[step]["dev_perplexity"]
      cells.append(f"{100.0 * (ratio - 1.0):+.1f}%")
    seeds = len(next(r for r in rows if r.config == config).summaries)
    lines.append(f"| {config} (n={seeds}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def paired_margins(row: Row, reference: Row) -> List[dict]:
  """A row's dev-perplexity margin vs the reference, seed by seed, per step.

  Seed s of a row is compared with seed s of the reference (the same data
  order: the data seed follows the run's seed), at the steps where both
  validated; a step enters when every seed the two rows share has it.

  Args:
    row: the compared row.
    reference: the baseline row.

  Returns:
    [{"step", "tokens", "margin", "low", "high", "seeds"}] in step order:
    margin = 100 * (mean over seeds of ppl_row / ppl_ref - 1), low / high
    the smallest and largest seed's margin; [] without a shared seed.
  """
  ref_by_seed = {s["seed"]: s for s in reference.summaries}
  pairs = [
      (s, ref_by_seed[s["seed"]])
      for s in row.summaries
      if s["seed"] in ref_by_seed
  ]
  if not pairs:
    return []

  def points(summary):
    return {p["step"]: p for p in summary["curve"] if p.get("dev_perplexity")}

  curves = [(points(a), points(b)) for a, b in pairs]
  steps = sorted(set.intersection(*[set(a) & set(b) for a, b in curves]))
  out = []
  for step in steps:
    margins = [
        100.0 * (a[step]["dev_perplexity"] / b[step]["dev_perplexity"] - 1.0)
        for a, b in curves
    ]
    out.append(
        {
            "step": step,
            "tokens": statistics.fmean(b[step]["tokens"] for _, b in curves),
            "margin": statistics.fmean(margins),
            "low": min(margins),
            "high": max(margins),
            "seeds": len(margins),
        }
    )
  return out


# The trend fit's window: points from this fraction of the final tokens on
# (1/4: the last two doublings of training tokens).
TREND_WINDOW = 0.25
# Extrapolations beyond this many times the measured tokens print as such.
TREND_HORIZON = 1000


def fit_log2_line(xs: Sequence[float], ys: Sequence[float]):
  """Least-squares y = a + b * log2(x); returns (a, b).

  Raises:
    ValueError: fewer than two distinct x.
  """
  logs = [math.log2(x) for x in xs]
  mean_x, mean_y = statistics.fmean(logs), statistics.fmean(ys)
  var = sum((u - mean_x) ** 2 for u in logs)
  if var == 0.0:
    raise ValueError("a trend needs two distinct token counts")
  slope = sum((u - mean_x) * (v - mean_y) for u, v in zip(logs, ys)) / var
  return mean_y - slope * mean_x, slope


def _tokens_to_reach(intercept, slope, target, tokens_end):
  """Where a + b log2(t) = target, in tokens; None if the line never gets
  there going forward (b >= 0 with the end above target); tokens_end if
  the line is already at or below target at the end; math.inf if it is
  further on than a float can hold (a nearly flat line)."""
  at_end = intercept + slope * math.log2(tokens_end)
  if at_end <= target:
    return tokens_end
  if slope >= 0.0:
    return None
  log2_tokens = (target - intercept) / slope
  if log2_tokens >= sys.float_info.max_exp:
    return math.inf
  return 2.0**log2_tokens


MARGIN_TREND_HEADING = (
    "## Margin trend (paired seeds; dev margin fitted as a line in"
    " log2(tokens) over the last two doublings; extrapolated)"
)


def trend_sections(
    rows: List[Row], references: List[Row], swept: List[Row], baseline: str
) -> List[str]:
  """The margin-trend sections both front ends print, in order.

  Args:
    rows: the table's rows.
    references: the rows the trends are against (`margin_trend_table`,
      one table each).
    swept: the sweep's rows (`sweep_rows`), for the per-rate margins
      against `baseline` (`sweep_margin_sections`).
    baseline: the sweep's baseline config.

  Returns:
    `MARGIN_TREND_HEADING`, a trend table per reference, then the sweep's
    per-rate margin sections (none with fewer than two rates).
  """
  return (
      [MARGIN_TREND_HEADING]
      + [margin_trend_table(rows, reference) for reference in references]
      + sweep_margin_sections(swept, baseline)
  )


def margin_trend_table(
    rows: List[Row], reference: Row, targets=(-5.0, -15.0)
) -> str:
  """Markdown: each row's margin vs reference as a line in log2(tokens).

  Per seed pair (seed s of the row against seed s of the reference, as
  `paired_margins`), the dev-perplexity margin in percent at the validated
  steps from TREND_WINDOW of the final tokens on is fitted by least squares
  as margin = a + b * log2(tokens): b is the change per doubling of training
  tokens. The table gives b (mean over pairs, min-max), the fitted margin at
  the end, and the training tokens at which the mean line would reach each
  target margin: an extrapolation of the measured trend, not a measurement
  (it assumes the trend of the window holds, e.g. no new overfitting).

  Args:
    rows: the rows compared (reference itself is skipped).
    reference: the row every margin is against.
    targets: margins (percent, negative = better) to extrapolate to.

  Returns:
    The markdown table, or a one-line note without paired seeds.
  """
  ref_by_seed = {s["seed"]: s for s in reference.summaries}
  header = (
      f"| vs {reference.config} | pairs | fit window | points |"
      " change per doubling | min-max | fitted margin at end | "
      + " | ".join(f"tokens to {t:+.0f}%" for t in targets)
      + " |"
  )
  lines = [header, "|---|---:|---|---:|---:|---|---:|" + "---:|" * len(targets)]
  for row in rows:
    if row is reference:
      continue
    fits, windows = [], []
    for summary in row.summaries:
      base = ref_by_seed.get(summary["seed"])
      if base is None:
        continue
      ref = {p["step"]: p for p in base["curve"] if p.get("dev_perplexity")}
      points = [
          (
              ref[p["step"]]["tokens"],
              100.0
              * (p["dev_perplexity"] / ref[p["step"]]["dev_perplexity"] - 1.0),
          )
          for p in summary["curve"]
          if p.get("dev_perplexity") and p["step"] in ref
      ]
      if not points:
        continue
      end = max(t for t, _ in points)
      window = [(t, m) for t, m in points if t >= TREND_WINDOW * end]
      if len({t for t, _ in window}) < 2:
        continue
      fits.append(fit_log2_line(*zip(*window)))
      windows.append((min(t for t, _ in window), end, len(window)))
    if not fits:
      continue
    start = statistics.fmean(w[0] for w in windows)
    end = statistics.fmean(w[1] for w in windows)
    slopes = [b for _, b in fits]
    intercept = statistics.fmean(a for a, _ in fits)
    slope = statistics.fmean(slopes)
    cells = []
    for target in targets:
      tokens = _tokens_to_reach(intercept, slope, target, end)
      if tokens is None:
        cells.append("not on this trend")
      elif tokens == end:
        cells.append("reached")
      elif tokens > TREND_HORIZON * end:
        cells.append(f"> {TREND_HORIZON}x")
      else:
        cells.append(f"{tokens / 1e6:,.0f}M ({tokens / end:.0f}x)")
    lines.append(
        f"| {row.config} | {len(fits)} | {start / 1e6:.1f}-{end / 1e6:.1f}M"
        f" tok | {windows[0][2]} | {slope:+.2f} pts |"
        f" {min(slopes):+.2f} to {max(slopes):+.2f} |"
        f" {intercept + slope * math.log2(end):+.1f}% | "
        + " | ".join(cells)
        + " |"
    )
  if len(lines) == 2:
    return f"(no seed of a row is paired with a {reference.config} seed)"
  return "\n".join(lines)


def corpus_builds_note(rows: List[Row]) -> Optional[str]:
  """One line when the rows' runs come from more than one corpus build.

  A run's summary records the hash of its corpus's build files
  (`results_lib.corpus_build`); a rebuilt corpus (the source archive moved
  on) changes every seeded batch order, so runs of different builds differ
  by more than their seeds alone would.

  Args:
    rows: the table's rows.

  Returns:
    The note, or None when every run has the same build (or none records
    one).
  """
  builds = collections.Counter(
      summary.get("corpus_build") or "unrecorded"
      for row in rows
      for summary in row.summaries
  )
  if len(builds) < 2:
    return None
  parts = ", ".join(
      f"{build} ({n} runs)" for build, n in sorted(builds.items())
  )
  return (
      f"Note: these runs come from {len(builds)} corpus builds: {parts}"
      " (unrecorded: finished before builds were recorded); a rebuilt"
      " corpus changes every seeded batch order."
  )


def time_to_quality_table(
    rows: List[Row], step_times: Optional[Dict[str, dict]] = None
) -> str:
  """Tokens and wall clock for each config to reach rows[0]'s final dev ppl.

  On the mean-over-seeds curves: the target is the baseline's mean final
  dev perplexity, and every ratio is against the point where the baseline's
  own mean curve first reaches it (its last point unless the curve dipped
  below its final value earlier).

  Args:
    rows: the table's rows; rows[0] is the baseline.
    step_times: `read_step_times`' {config: {"seconds_per_step",
      "tokens_per_step"}}, measured on an idle machine; with it, two more
      columns give the time to the target at that speed: tokens to target /
      tokens per step x seconds per step (the runs' own wall clock counts
      whatever else shared the machine).

  Returns:
    The markdown table with a one-paragraph header.
  """
  step_times = step_times or {}
  base = rows[0]
  base_curve = mean_curve(base.summaries)
  if not base_curve:
    return "(no baseline runs yet)"
  target = base_curve[-1]["dev_perplexity"]

  def idle_seconds(config, tokens):
    speed = step_times.get(config)
    if speed is None:
      return None
    return tokens / speed["tokens_per_step"] * speed["seconds_per_step"]

  # The baseline's own first crossing, not its last point: a mean curve
  # that dips below its final value earlier reached that quality there, and
  # the ratios compare like with like.
  base_tokens = first_crossing(base_curve, target, "tokens")
  base_seconds = first_crossing(base_curve, target, "train_seconds")
  base_idle = idle_seconds(base.config, base_tokens)
  timed = base_idle is not None
  lines = [
      f"Target: the baseline's ({base.config}) final dev perplexity, mean"
      f" over its {len(base.summaries)} seeds: {target:.2f}. Crossings on"
      " the mean-over-seeds dev curves, linearly interpolated."
      + (
          " At measured step time: tokens to target at each config's"
          " seconds per step measured on an idle machine"
          f" ({results_step_time.STEP_TIME_FILE})."
          if timed
          else ""
      ),
      "",
      "| config | seeds | tokens to target | vs baseline |"
      " wall clock to target | vs baseline |"
      + (" at measured step time | vs baseline |" if timed else ""),
      "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if timed else ""),
  ]
  for row in rows:
    curve = mean_curve(row.summaries)
    if not curve:
      continue
    tokens = first_crossing(curve, target, "tokens")
    if tokens is None:
      lines.append(
          f"| {row.config} | {len(row.summaries)} | not reached in"
          f" {curve[-1]['tokens'] / 1e6:.2f}M | - | - | -"
          + (" | - | - |" if timed else " |")
      )
      continue
    seconds = first_crossing(curve, target, "train_seconds")
    line = (
        f"| {row.config} | {len(row.summaries)} | {tokens / 1e6:.2f}M |"
        f" {tokens / base_tokens:.2f}x | {seconds / 60:.1f} min |"
        f" {seconds / base_seconds:.2f}x |"
    )
    if timed:
      idle = idle_seconds(row.config, tokens)
      line += (
          " - | - |"
          if idle is None
          else f" {idle / 60:.1f} min | {idle / base_idle:.2f}x |"
      )
    lines.append(line)
  return "\n".join(lines)


def isfinite(value) -> bool:
  return value is not None and math.isfinite(value)
