"""Pytest configuration for the distribution tests.

The heavy tests run in subprocesses (`dist_testlib.run_scenario`) that
split the CPU into 8 logical devices before TensorFlow initializes (or set
XLA's host device count for JAX); this process never does.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
