"""Trainer tests: one thread (two OpenMP threads on two busy cores thrash) and no hub access.

The test command sets the same variables; this keeps a direct `pytest tests/trainer` run alike.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# Tests share helpers by importing sibling test modules (pytest runs with --import-mode=importlib,
# which does not put this directory on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))
