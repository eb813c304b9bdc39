"""Kernel tests: the Triton kernels run on CUDA when a GPU is present, else in the interpreter.

TRITON_INTERPRET must be set before triton is first imported, which is why it is set here, at
collection time, and not in a fixture. An explicit TRITON_INTERPRET in the environment wins.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: larger sweep that needs a CUDA GPU (skipped without)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
