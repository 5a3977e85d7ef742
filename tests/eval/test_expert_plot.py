"""The expert importance/load plot reads from 4 to 4096 experts."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from eval import expert_stats  # pylint: disable=g-import-not-at-top


def _stats(n):
  rng = np.random.default_rng(n)
  values = rng.uniform(0.5, 1.5, n)
  return {
      "importance": values,
      "load": values[::-1],
      "cv_importance": 0.1,
      "cv_load": 0.1,
      "max_over_mean_load": 1.5,
  }


@pytest.mark.parametrize("n", [4, 7, 64, 4096])
def test_integer_ticks_and_gaps(n, tmp_path):
  fig = expert_stats.expert_figure("moe", _stats(n))
  try:
    fig.canvas.draw()
    for ax in fig.axes:
      ticks = [t for t in ax.get_xticks() if -0.5 <= t <= n - 0.5]
      assert ticks and all(float(t).is_integer() for t in ticks), ticks
      bars = ax.patches
      assert len(bars) == n
      # The gap between neighbouring bars is at least one pixel.
      left = ax.transData.transform([(bars[0].get_x(), 0)])[0, 0]
      right = ax.transData.transform(
          [(bars[0].get_x() + bars[0].get_width(), 0)]
      )[0, 0]
      next_left = ax.transData.transform([(bars[1].get_x(), 0)])[0, 0]
      assert right - left >= 1.5 and next_left - right >= 0.9
  finally:
    plt.close(fig)
  paths = expert_stats.plot_expert_stats({"moe": _stats(n)}, str(tmp_path))
  assert paths == [str(tmp_path / "experts_moe.png")]
