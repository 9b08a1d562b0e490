"""The ``Examples:`` blocks of the public entry points people call from Python run as written (doctest)."""

from __future__ import annotations

import doctest

import pytest

from vkd.engine.task import DistillationTask
from vkd.engine.trainer import train_task
from vkd.render.rendering import rasterization
from vkd.skt.losses import SKTLoss

# Entry points whose examples need no downloaded weights or scene (the others mark their lines +SKIP).
RUNNABLE = [rasterization, DistillationTask, train_task, SKTLoss]


@pytest.mark.parametrize("obj", RUNNABLE, ids=lambda o: o.__qualname__)
def test_examples_run(obj, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(recurse=False)
    module = __import__(obj.__module__, fromlist=["_"])
    tests = finder.find(obj, obj.__qualname__, globs=dict(vars(module)))
    examples = [ex for t in tests for ex in t.examples if not ex.options.get(doctest.SKIP)]
    assert examples, f"{obj.__qualname__} has no runnable Examples block"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} example(s) of {obj.__qualname__} failed (see captured output)"
