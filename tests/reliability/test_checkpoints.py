"""Checkpoint directories a killed process can leave behind: pruning never leaves a damaged ``checkpoint-N``,
hidden leftovers are removed at the next start, and ``--resume`` skips a damaged newest checkpoint for the
newest intact one (and refuses to start over when none is intact)."""

from __future__ import annotations

import pytest
import torch

from vkd.config import apply_overrides
from vkd.engine import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    save_checkpoint,
    train_task,
)
from vkd.engine.checkpoint import latest_valid_checkpoint, remove_stale
from vkd.engine.toy import ToyConfig, ToyTask, make_toy_data
from vkd.errors import DataError

pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(tmp_path, name, *overrides):
    return apply_overrides(ToyConfig(), [f"run.output_dir={tmp_path}", f"run.name={name}", "train.steps=30",
                                         "train.checkpoint_every=10", "train.log_every=5", "train.keep_last=0",
                                         *overrides])


def _run(cfg, resume=None):
    return train_task(cfg, ToyTask(cfg), make_toy_data(cfg), resume=resume)


def test_pruning_killed_midway_never_leaves_a_damaged_checkpoint(tmp_path, monkeypatch):
    import vkd.engine.checkpoint as ckpt

    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"w": torch.ones(2) * step}, {"step": step})

    def killed_rmtree(path, ignore_errors=False):  # the process dies after deleting one file
        next(p for p in sorted(path.iterdir()) if p.name == "meta.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, {"w": torch.ones(2) * 3}, {"step": 3}, keep_last=2)
    monkeypatch.undo()
    # checkpoint-1 was renamed to a hidden name before its files were deleted
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not (tmp_path / "checkpoint-1").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers and all(n.startswith(".old-checkpoint-1-") for n in leftovers)
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    full = _cfg(tmp_path, "full")
    _run(full)
    cfg = _cfg(tmp_path, "damaged")
    _run(cfg)
    ckpts = cfg.run_dir() / "checkpoints"
    (ckpts / "checkpoint-30" / "model.safetensors").write_bytes(b"\0" * 16)  # damaged after it was written
    (ckpts / ".tmp-checkpoint-40-123").mkdir()  # and a half-written one
    assert latest_valid_checkpoint(cfg.run_dir())[0].name == "checkpoint-20"
    summary = _run(cfg, resume="latest")
    assert summary["resumed_from"].endswith("checkpoint-20")
    assert "skipping corrupt checkpoint checkpoint-30" in capsys.readouterr().err
    assert not (ckpts / ".tmp-checkpoint-40-123").exists()
    a = load_checkpoint_weights(latest_checkpoint(full.run_dir()))
    b = load_checkpoint_weights(latest_checkpoint(cfg.run_dir()))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the rewritten checkpoint-30 equals the uninterrupted one


def test_resume_refuses_to_start_over_when_no_checkpoint_is_intact(tmp_path):
    cfg = _cfg(tmp_path, "all_bad", "train.steps=10")
    _run(cfg)
    (cfg.run_dir() / "checkpoints" / "checkpoint-10" / "training_state.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="no intact checkpoint to resume from"):
        _run(cfg, resume="latest")
    with pytest.raises(DataError, match="sha256 mismatch"):  # an explicit path is checked too
        _run(cfg, resume=cfg.run_dir() / "checkpoints" / "checkpoint-10")
