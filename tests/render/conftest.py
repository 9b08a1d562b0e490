"""Render tests run single-threaded: the tiny blocks gain nothing from threads, and on a shared 2-core machine
spinning OpenMP workers slow small ops down by orders of magnitude."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
