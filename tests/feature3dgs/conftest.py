"""Fixtures of the Feature 3DGS tests."""

from __future__ import annotations

import pytest
import torch
from f3d_helpers import STUB


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # compute.cpu_threads changes a process-wide setting
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stub_teacher(tmp_path, monkeypatch):
    """The stand-in teacher as module ``f3d_stub_teacher`` importable from ``tmp_path`` (returned)."""
    (tmp_path / "f3d_stub_teacher.py").write_text(STUB)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path
