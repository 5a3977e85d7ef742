"""Gin entry point: the experiment asks for "the data", gin says which.

Every `gin/data/*.gin` file binds `get_data.data_fn` to one corpus function
(`@ptb_lm_data`, `@wmt14_mt_data`, ...) and that function's `train_files` /
`eval_files` to the macros `TRAIN_FILES` / `EVAL_FILES`. A trainer calls

  data = data_pipelines.get_data()

after parsing its gin files and receives an `LmData` or `MtData`.
"""

from typing import Callable, Union

import gin

from data_pipelines import lm
from data_pipelines import mt


@gin.configurable
def get_data(
    data_fn: Callable[[], Union[lm.LmData, mt.MtData]] = gin.REQUIRED,
) -> Union[lm.LmData, mt.MtData]:
  """Builds the experiment's data with the gin-selected corpus function.

  Args:
    data_fn: a corpus function such as `ptb_lm_data` (bound in gin as
      `get_data.data_fn = @ptb_lm_data`).

  Returns:
    LmData (language modelling) or MtData (translation).
  """
  return data_fn()
