"""BLEU against hand-computed values on tiny examples."""

import math

import pytest

from eval import bleu


def test_hand_computed_single_segment():
  # hyp "a b c d e" vs ref "a b c d f g": precisions 4/5, 3/4, 2/3, 1/2,
  # c = 5 < r = 6 so BP = exp(1 - 6/5).
  expected = 100 * math.exp(1 - 6 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
  result = bleu.tokenized_bleu(["a b c d e"], ["a b c d f g"])
  assert result.score == pytest.approx(expected, abs=1e-6)
  assert result.hyp_len == 5 and result.ref_len == 6
  sacre = bleu.sacre_bleu(["a b c d e"], ["a b c d f g"])
  assert sacre.score == pytest.approx(expected, abs=1e-6)
  assert "tok:13a" in sacre.signature and "smooth:exp" in sacre.signature


def test_corpus_counts_are_summed():
  # seg 1: hyp "a b c d" == ref: 4/4, 3/3, 2/2, 1/1.
  # seg 2: hyp "x y z w" vs ref "x y q w": 1-grams 3/4, 2-grams 1/3 (x y),
  # 3-grams 0/2, 4-grams 0/1. Corpus: 7/8, 4/6, 2/4, 1/2; c = r = 8.
  expected = 100 * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 2) ** 0.25
  result = bleu.tokenized_bleu(["a b c d", "x y z w"], ["a b c d", "x y q w"])
  assert result.score == pytest.approx(expected, abs=1e-6)


def test_zero_precision_gives_zero_like_multi_bleu():
  # No 4-gram of "a b c x d" is in the reference: multi-bleu.pl gives 0.
  assert bleu.tokenized_bleu(["a b c x d"], ["a b c d"]).score == 0.0
  # sacreBLEU's default exponential smoothing does not.
  assert bleu.sacre_bleu(["a b c x d"], ["a b c d"]).score > 0.0


def test_13a_pretokenization_is_applied_to_both_sides():
  result = bleu.tokenized_bleu(
      ["Hello, world. It works!"], ["Hello , world . It works !"]
  )
  assert result.score == pytest.approx(100.0)
  assert result.signature.startswith("pretok:13a|")
  assert "tok:none" in result.signature and "smooth:none" in result.signature


def test_mismatched_line_counts_one_line_error():
  with pytest.raises(ValueError, match="reference has 1 lines but there are 2"):
    bleu.sacre_bleu(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="empty input"):
    bleu.tokenized_bleu([], [])


def test_cli(tmp_path, capsys):
  hyp = tmp_path / "hyp.txt"
  ref = tmp_path / "ref.txt"
  hyp.write_text("a b c d\n")
  ref.write_text("a b c d\nextra\n")
  assert bleu.main([f"--hypotheses={hyp}", f"--references={ref}"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "reference has 2 lines" in err
  ref.write_text("a b c d\n")
  assert bleu.main([f"--hypotheses={hyp}", f"--references={ref}"]) == 0
  assert '"score": 100.0' in capsys.readouterr().out
