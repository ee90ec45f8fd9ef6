"""Kernel tests: the Triton interpreter is switched on by ../conftest.py; helpers are in kernel_numerics.py."""
import os
import sys

import pytest
import torch

# Let the test modules import kernel_numerics whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
