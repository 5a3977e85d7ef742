"""Pytest configuration for the SparseMoE layer tests.

Makes `numpy_reference` (the independent numpy reference next to this file)
importable regardless of pytest's import mode or package layout, and quiets
TensorFlow's C++ logging.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
