"""Run the Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before lmconvert.kernels
is imported; if another test module imported it first, reload the kernel modules under the interpreter.
"""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

_loaded = sorted(m for m in sys.modules if m.startswith("lmconvert.kernels"))
for _name in _loaded:  # _triton first (sorted), so the others pick up INTERPRET = True
    importlib.reload(sys.modules[_name])

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

