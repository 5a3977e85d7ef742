"""pytest setup for tests/data_pipelines: import paths and quieter TF logs."""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_HERE = pathlib.Path(__file__).resolve().parent
for _path in (str(_HERE.parents[1]), str(_HERE)):
  if _path not in sys.path:
    sys.path.insert(0, _path)
