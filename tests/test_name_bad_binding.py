"""reliability.name_bad_binding: which gin binding a bad-value error names.

Expected strings are written by hand from the bindings each test parses.
"""

import gin
import pytest

from moe_keras import reliability


@gin.configurable("name_bad_binding_test")
def _configured(steps_per_eval=1, steps_per_checkpoint=1, width=1):
  return steps_per_eval, steps_per_checkpoint, width


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _name(bindings, message):
  gin.parse_config(bindings)
  return reliability.name_bad_binding(ValueError(message))


def test_a_value_shared_by_several_bindings_goes_to_the_one_named():
  # WARMUP_STEPS shares the value 200 but is not what the message is about
  # (a run of moe_keras.train once blamed it).
  bindings = [
      "WARMUP_STEPS = 200",
      "STEPS_PER_CHECKPOINT = 200",
      "name_bad_binding_test.steps_per_checkpoint = %STEPS_PER_CHECKPOINT",
      "name_bad_binding_test.steps_per_eval = 100",
  ]
  message = (
      "training.steps_per_eval=100 must be a multiple of"
      " steps_per_checkpoint=200"
  )
  # Gin spells the selector with its module: "<module>.name_bad_binding_test".
  named = _name(bindings, message)
  assert named.startswith("bad value for "), named
  assert named.endswith(
      f"name_bad_binding_test.steps_per_eval = 100: {message}"
  ), named


def test_a_macro_is_named_by_its_lower_case_spelling():
  bindings = ["WARMUP_STEPS = 200", "STEPS_PER_CHECKPOINT = 200"]
  message = "steps_per_checkpoint=200 must divide the training steps"
  assert _name(bindings, message) == (
      f"bad value for STEPS_PER_CHECKPOINT = 200: {message}"
  )


def test_the_only_binding_with_the_value_is_named():
  message = "invalid literal for int() with base 10: 'sixteen'"
  assert _name(["MODEL_DIM = 'sixteen'", "DROPOUT = 0.1"], message) == (
      f"bad value for MODEL_DIM = 'sixteen': {message}"
  )


def test_no_guess_between_bindings_that_share_an_unnamed_value():
  message = "Received: units=7"
  assert _name(["A_WIDTH = 7", "B_WIDTH = 7"], message) == message


def test_no_binding_in_the_message_leaves_it_as_it_is():
  message = "something else went wrong"
  assert _name(["MODEL_DIM = 128"], message) == message
