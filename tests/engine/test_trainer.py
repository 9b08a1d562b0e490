"""The training engine: exact resume, data order, accumulation, EMA, faults, safe loading."""

from __future__ import annotations

import json
import os
import pickle
import signal

import pytest
import torch

from vkd.config import apply_overrides
from vkd.engine import (
    GlobalBatchSampler,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    load_training_state,
    save_checkpoint,
    torch_threads,
    train_task,
    verify_checkpoint,
)
from vkd.engine.toy import ToyConfig, ToyTask, make_toy_data
from vkd.errors import DataError, NonFiniteError, TrainingInterrupted, UserError


def _cfg(tmp_path, name, *overrides):
    return apply_overrides(ToyConfig(), [f"run.output_dir={tmp_path}", f"run.name={name}", "train.steps=30",
                                         "train.checkpoint_every=10", "train.log_every=5", *overrides])


def _run(cfg, resume=None):
    return train_task(cfg, ToyTask(cfg), make_toy_data(cfg), resume=resume)


def _final_weights(cfg):
    return load_checkpoint_weights(latest_checkpoint(cfg.run_dir()))


@pytest.mark.parametrize("extra", [[], ["train.ema_decay=0.9", "train.scheduler=cosine", "train.warmup_steps=4"]])
def test_resume_equals_uninterrupted_run(tmp_path, extra):
    full = _cfg(tmp_path, "full", "train.steps=20", *extra)
    _run(full)
    # Interrupt the second run with SIGINT after step 13 (not a checkpoint step): the engine must
    # save checkpoint-13 before exiting, and resuming from it must give the same weights.
    half = _cfg(tmp_path, "half", "train.steps=20", *extra)
    task = _SignalTask(half)
    task.signal_at = 13
    with pytest.raises(TrainingInterrupted, match="step 13"):
        train_task(half, task, make_toy_data(half))
    assert [s for s, _ in list_checkpoints(half.run_dir() / "checkpoints")] == [10, 13]
    resumed = half
    summary = _run(resumed, resume="latest")
    assert summary["resumed_from"].endswith("checkpoint-13")
    a, b = _final_weights(full), _final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ck_a, ck_b = latest_checkpoint(full.run_dir()), latest_checkpoint(resumed.run_dir())
    if (ck_a / "ema.safetensors").exists():
        ea, eb = load_checkpoint_weights(ck_a, "ema.safetensors"), load_checkpoint_weights(ck_b, "ema.safetensors")
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
        assert not torch.equal(ea["0.weight"], a["student.0.weight"])  # the EMA is a different average


def test_run_directory_layout_and_metrics(tmp_path):
    cfg = _cfg(tmp_path, "layout", "train.keep_last=2")
    summary = _run(cfg)
    run_dir = cfg.run_dir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples", "checkpoints"):
        assert (run_dir / name).exists(), name
    steps = [s for s, _ in list_checkpoints(run_dir / "checkpoints")]
    assert steps == [20, 30]  # keep_last=2 pruned checkpoint-10
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30]
    assert {"mse", "kd", "lr", "grad_norm", "steps_per_s"} <= set(train_records[0])
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert summary["eval"]["test_mse"] == pytest.approx(records[-1]["eval/test_mse"])
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 30 and saved["status"] == "finished"
    verify_checkpoint(latest_checkpoint(run_dir))


def test_refuses_to_clobber_existing_run(tmp_path):
    cfg = _cfg(tmp_path, "again", "train.steps=10")
    _run(cfg)
    with pytest.raises(UserError, match="--resume"):
        _run(cfg)


def test_sampler_is_deterministic_sharded_and_resumable():
    single = GlobalBatchSampler(10, 4, world_size=1, seed=3)
    ranks = [GlobalBatchSampler(10, 4, world_size=2, rank=r, seed=3) for r in range(2)]
    for step in range(7):  # crosses epoch boundaries (10 is not a multiple of 4)
        whole = single.indices(step, 0)
        parts = [s.indices(step, 0) for s in ranks]
        assert parts[0] + parts[1] == whole
        assert not set(parts[0]) & set(parts[1])
    # Every sample appears once per epoch.
    stream = [i for step in range(5) for i in single.indices(step, 0)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    late = iter(GlobalBatchSampler(10, 4, seed=3, start_step=3))
    assert next(late) == single.indices(3, 0)
    with pytest.raises(UserError, match="divisible"):
        GlobalBatchSampler(10, 5, world_size=2)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    a = _cfg(tmp_path, "acc1", "train.steps=10", "train.optimizer=sgd", "train.momentum=0.0")
    b = _cfg(tmp_path, "acc2", "train.steps=10", "train.optimizer=sgd", "train.momentum=0.0", "train.grad_accum=2")
    _run(a)
    _run(b)
    wa, wb = _final_weights(a), _final_weights(b)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


class _SignalTask(ToyTask):
    def on_step_end(self, step, outputs, optimizers):
        if step == self.signal_at:
            os.kill(os.getpid(), signal.SIGINT)


class _ExplodingTask(ToyTask):
    def forward(self, batch):
        out = super().forward(batch)
        if self.explode_at is not None and self.calls >= self.explode_at:
            out["loss"] = out["loss"] * float("nan")
        self.calls += 1
        return out


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "nan", "train.steps=30")
    task = _ExplodingTask(cfg)
    task.calls, task.explode_at = 0, 14
    with pytest.raises(NonFiniteError, match="step 15") as info:
        train_task(cfg, task, make_toy_data(cfg))
    assert info.value.step == 15
    assert [s for s, _ in list_checkpoints(cfg.run_dir() / "checkpoints")] == [10]
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert summary["status"] == "non-finite" and summary["checkpoint"].endswith("checkpoint-10")


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "fail", "train.steps=20")
    import vkd.engine.checkpoint as ckpt

    real_save = ckpt.save_file
    calls = {"n": 0}

    def flaky_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > 1:  # the first checkpoint succeeds, the second hits a "full disk"
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", flaky_save)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint intact"):
        _run(cfg)
    found = list_checkpoints(cfg.run_dir() / "checkpoints")
    assert [s for s, _ in found] == [10]
    verify_checkpoint(found[0][1])
    assert not [p for p in (cfg.run_dir() / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_corrupt_checkpoint_is_detected(tmp_path):
    path = save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, {"step": 5})
    verify_checkpoint(path)
    with open(path / "model.safetensors", "r+b") as handle:
        handle.seek(-2, os.SEEK_END)
        handle.write(b"\x00\x01")
    with pytest.raises(DataError, match="corrupt"):
        verify_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"step": 1})
    with open(path / "training_state.pt", "wb") as handle:
        pickle.dump({"optimizers": _Evil()}, handle)
    with pytest.raises(DataError, match="refusing to load"):
        load_training_state(path)


def test_torch_threads_restores_the_process_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("a failing task")
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0 = leave torch's setting, but still restore whatever the block changes
        assert torch.get_num_threads() == before
        torch.set_num_threads(1)
    assert torch.get_num_threads() == before


def test_with_final_ema_and_a_partial_ema(tmp_path):
    """Exports read the newest checkpoint's EMA (a copy); no EMA: the module itself; an EMA of some tensors only
    (LoRA adapters) loads non-strictly and averages just those."""
    from torch import nn

    from vkd.engine import EMA, with_final_ema

    net = nn.Linear(3, 2)
    assert with_final_ema(net, tmp_path) is net  # no checkpoint yet
    ema = EMA(net, 0.5, keys=["weight"])
    assert set(ema.state_dict()) == {"weight"}
    with torch.no_grad():
        net.weight.add_(2.0)
        net.bias.add_(2.0)
    ema.update(net)
    save_checkpoint(tmp_path / "checkpoints", 3, dict(net.state_dict()), {"step": 3}, ema.state_dict())
    averaged = with_final_ema(net, tmp_path, strict=False)
    assert averaged is not net
    torch.testing.assert_close(averaged.weight, net.weight - 1.0)  # halfway from the old weights
    torch.testing.assert_close(averaged.bias, net.bias)  # not tracked: the module's own
    with pytest.raises(KeyError, match="not in the module"):
        EMA(net, 0.5, keys=["nope"])
    with ema.swapped_into(net):
        torch.testing.assert_close(net.weight, averaged.weight)
    torch.testing.assert_close(net.weight, averaged.weight + 1.0)  # restored after the block
