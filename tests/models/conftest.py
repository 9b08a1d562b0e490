"""Tiny models: one intra-op thread. On a shared 2-core machine two OpenMP threads spin against other
processes and made a 60-step pretraining 25× slower (107 s vs 4 s, measured)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
