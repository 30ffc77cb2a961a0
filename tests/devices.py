"""Where device-parametrized tests run: the CPU always, and a CUDA GPU where the machine has one.

CI has no GPU, so the ``cuda`` cases are skipped there; a session lent a GPU runs them with
``pytest -m cuda`` (``benchmarks/cuda_check.sh``).
"""

import pytest
import torch

#: the ``cuda`` case of a device-parametrized test
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)
DEVICES = ["cpu", CUDA]
