import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import normops  # noqa: E402,F401


def pytest_report_header(config):
    return (f"torch {torch.__version__}, normops CPU kernels: {normops.cpu_capability()}, "
            f"CUDA available: {torch.cuda.is_available()}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
