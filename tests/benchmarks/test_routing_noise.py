"""benchmarks/routing_noise.py's statistics against hand-derived values."""

import math
import os
import sys

import numpy as np

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
sys.path.insert(0, REPO)

from benchmarks import routing_noise  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_gate_decides_when_gaps_dwarf_the_noise():
  # 3 tokens, d = 3 one-hot inputs, n = 4 experts, k = 2; W_noise = -50
  # gives a noise std of softplus(-50) ~ 2e-22, i.e. none.
  x = np.eye(3)
  w_gate = np.array(
      [[5.0, 4.0, 0.0, 0.0], [0.0, 6.0, 3.0, 1.0], [2.0, 0.0, 0.0, 9.0]]
  )
  s = routing_noise.routing_noise_stats(
      x, w_gate, np.full((3, 4), -50.0), 2, 0.0, np.random.default_rng(0)
  )
  assert s["overlap"] == 1.0
  assert s["noise_std"] < 1e-20
  # k-th minus (k+1)-th clean logit per token: 4-0, 3-1, 2-0 -> median 2.
  assert s["gap"] == 2.0
  # clean top-2: {0,1}, {1,2}, {3,0}: expert 0 and 1 twice of 6 picks, n=4
  # -> max/mean = 2 / (6 / 4).
  assert math.isclose(s["load_clean"], 2 / 1.5)
  assert math.isclose(s["load_noisy"], 2 / 1.5)
  spreads = [np.std(row) for row in w_gate]
  assert math.isclose(s["logit_spread"], np.mean(spreads))


def test_noise_decides_at_the_papers_initialization():
  # W_g = W_noise = 0: equal clean logits, noise std softplus(0) + eps, the
  # noisy top-k a uniform random k-subset: expected overlap k/n = 0.25.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((20000, 5))
  s = routing_noise.routing_noise_stats(
      x, np.zeros((5, 8)), np.zeros((5, 8)), 2, 0.01, np.random.default_rng(2)
  )
  assert math.isclose(s["noise_std"], math.log(2.0) + 0.01, rel_tol=1e-9)
  # std of the mean of 20000 overlaps (each in {0, .5, 1}) is < 0.003.
  assert abs(s["overlap"] - 0.25) < 0.015
  assert s["gap"] == 0.0 and s["logit_spread"] == 0.0
  # Clean ties all go to experts 0 and 1: max/mean = n / k = 4.
  assert math.isclose(s["load_clean"], 4.0)
  assert s["load_noisy"] < 1.1


def test_noise_scale_multiplies_the_std():
  # Gaps of ~0.01 against the paper's std of ~0.7: the noise decides; the
  # same gate with the std scaled by 1e-6 decides itself.
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2000, 4))
  w_gate = 0.01 * rng.standard_normal((4, 8))
  zeros = np.zeros((4, 8))
  paper = routing_noise.routing_noise_stats(
      x, w_gate, zeros, 2, 0.01, np.random.default_rng(4)
  )
  scaled = routing_noise.routing_noise_stats(
      x, w_gate, zeros, 2, 0.01, np.random.default_rng(4), noise_scale=1e-6
  )
  assert math.isclose(paper["noise_std"], math.log(2.0) + 0.01)
  assert math.isclose(scaled["noise_std"], 1e-6 * (math.log(2.0) + 0.01))
  assert paper["overlap"] < 0.5
  assert scaled["overlap"] == 1.0


def test_hierarchical_gate_decides_when_gaps_dwarf_the_noise():
  # a = 2 groups of b = 3, k_primary = 1, k_secondary = 2; one-hot tokens.
  # Token 0: primary logits [0, 5] -> group 1; group 1's logits for it
  # [1, 7, 3] -> experts 1, 2 of group 1 = ids 4, 5. Token 1: [4, 0] ->
  # group 0; [9, 0, 2] -> experts 0, 2 = ids 0, 2.
  x = np.eye(2)
  w_gate = np.array([[0.0, 5.0], [4.0, 0.0]])
  w_gate_secondary = np.zeros((2, 2, 3))
  w_gate_secondary[1, 0] = [1.0, 7.0, 3.0]
  w_gate_secondary[0, 1] = [9.0, 0.0, 2.0]
  s = routing_noise.hierarchical_routing_noise_stats(
      x,
      w_gate,
      np.full((2, 2), -50.0),
      w_gate_secondary,
      np.full((2, 2, 3), -50.0),
      1,
      2,
      0.0,
      np.random.default_rng(0),
  )
  assert s["overlap"] == 1.0 and s["group_overlap"] == 1.0
  assert s["noise_std"] < 1e-20
  # Secondary 2nd minus 3rd logit in the token's group: 3 - 1, 2 - 0.
  assert s["gap"] == 2.0
  # Four distinct experts of 6, one assignment each: max/mean = 1 / (4/6).
  assert math.isclose(s["load_clean"], 1.5)
  assert math.isclose(s["load_noisy"], 1.5)
  want_spread = np.mean([np.std([1.0, 7.0, 3.0]), np.std([9.0, 0.0, 2.0])])
  assert math.isclose(s["logit_spread"], want_spread)


def test_hierarchical_noise_decides_at_the_papers_initialization():
  # All gates 0: the noisy routing is a uniform random k_p of a groups and
  # k_s of b experts in each: expected group overlap k_p / a = 0.5 and
  # expert overlap (k_p / a) (k_s / b) = 0.25 (a = b = 4, k_p = k_s = 2).
  rng = np.random.default_rng(1)
  x = rng.standard_normal((20000, 3))
  s = routing_noise.hierarchical_routing_noise_stats(
      x,
      np.zeros((3, 4)),
      np.zeros((3, 4)),
      np.zeros((4, 3, 4)),
      np.zeros((4, 3, 4)),
      2,
      2,
      0.01,
      np.random.default_rng(2),
  )
  assert abs(s["group_overlap"] - 0.5) < 0.015
  assert abs(s["overlap"] - 0.25) < 0.015
  assert math.isclose(s["noise_std"], math.log(2.0) + 0.01, rel_tol=1e-9)
  # Clean ties: groups 0, 1 and experts 0, 1 of each (ids 0, 1, 4, 5) for
  # every token: max/mean = 16 / 4.
  assert math.isclose(s["load_clean"], 4.0)
  assert s["load_noisy"] < 1.1


def test_training_routing_perplexity(tmp_path):
  # The tiny MoE LM, untrained, on a small random corpus. W_noise = 0: noise
  # std softplus(0) = 0.69 for every token. With clean logits scaled so that
  # their gaps are ~1e4 times the noise, the training routing is the clean
  # top-k and both perplexities must be equal. With clean logits ~1e-3 the
  # noise picks other experts and the perplexity must change; the layers
  # must be restored afterwards (clean again).
  import gin  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  from moe_keras import experiment  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(50)]
  for split, lines in (("train", 40), ("valid", 40)):
    with open(tmp_path / f"{split}.txt", "w") as f:
      for _ in range(lines):
        f.write(" ".join(rng.choice(words, rng.integers(3, 10))) + "\n")
  gin.clear_config()
  try:
    experiment.parse_gin(
        [os.path.join(REPO, "gin/lm/tiny/moe_flat.gin")],
        [
            f"TRAIN_FILES = '{tmp_path / 'train.txt'}'",
            f"EVAL_FILES = '{tmp_path / 'valid.txt'}'",
        ],
    )
    keras.utils.set_random_seed(0)  # the same initial model in any process
    task, model = experiment.build_task_and_model()
    model(next(iter(task.eval_dataset()))[0], training=False)
    moes = [
        layer
        for layer in model._flatten_layers()  # pylint: disable=protected-access
        if getattr(layer, "gating", None) == "noisy_top_k"
    ]
    assert len(moes) == 1
    moe = moes[0]
    gate = rng.standard_normal(moe.w_gate.shape)
    # Distinct, large experts: which experts a token gets decides its output
    # (at initialization the MoE's contribution is too small to test on).
    for name in ("expert_kernel_1", "expert_kernel_2"):
      shape = moe.expert_weight(name).shape
      moe.set_expert_weight(name, 3.0 * rng.standard_normal(shape))
    moe.w_noise.assign(np.zeros(moe.w_noise.shape))
    moe.w_gate.assign(1e5 * gate)
    seen = []  # the `training` argument of every routing call (traced)
    route = moe._route  # pylint: disable=protected-access

    def recording_route(tokens, valid, training, noise):
      seen.append(training)
      return route(tokens, valid, training, noise)

    moe._route = recording_route  # pylint: disable=protected-access
    clean, noisy = routing_noise.routing_perplexities(task, model, moes, 3, 0)
    # Inference routing for the first evaluation, training routing for the
    # second, and the layer's own attribute back afterwards.
    assert seen and seen[0] is False and seen[-1] is True, seen
    assert moe._route is recording_route  # pylint: disable=protected-access
    del moe._route  # pylint: disable=protected-access
    assert math.isclose(clean, noisy, rel_tol=1e-6), (clean, noisy)
    moe.w_gate.assign(1e-3 * gate)
    clean2, noisy2 = routing_noise.routing_perplexities(task, model, moes, 3, 0)
    assert noisy2 != clean2, (clean2, noisy2)
    assert "_route" not in vars(moe)  # restored
    moe.w_gate.assign(1e5 * gate)
    clean3, _ = routing_noise.routing_perplexities(task, model, moes, 3, 0)
    assert clean3 == clean
  finally:
    gin.clear_config()
