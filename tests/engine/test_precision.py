"""``auto`` precision choices and the fused optimizer option of the engine."""

from __future__ import annotations

import pytest
import torch

from vkd.config import TrainConfig, apply_overrides
from vkd.engine import build_optimizer, native_bf16, resolve_mixed_precision, train_task
from vkd.engine import precision as precision_mod
from vkd.engine.toy import ToyConfig, ToyTask, make_toy_data


@pytest.mark.parametrize(("flags", "native"), [({"avx512_bf16", "avx2"}, True), ({"amx_bf16"}, True),
                                               ({"avx512f", "avx2"}, False), (set(), False)])
def test_auto_picks_bf16_only_where_the_cpu_has_it(monkeypatch, flags, native):
    monkeypatch.setattr(precision_mod, "_cpu_flags", lambda: frozenset(flags))
    assert native_bf16("cpu") is native
    assert resolve_mixed_precision("auto", "cpu") == ("bf16" if native else "no")
    for explicit in ("no", "fp16", "bf16"):  # explicit choices are never changed
        assert resolve_mixed_precision(explicit, "cpu") == explicit


def test_cpu_flags_are_read_from_proc_cpuinfo():
    precision_mod._cpu_flags.cache_clear()
    flags = precision_mod._cpu_flags()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert flags == frozenset()
        return
    assert ("avx512_bf16" in flags) == (" avx512_bf16" in text)


@pytest.mark.parametrize("native", [True, False])
def test_trainer_resolves_auto_and_records_it(tmp_path, monkeypatch, native):
    monkeypatch.setattr(precision_mod, "_cpu_flags", lambda: frozenset({"avx512_bf16"} if native else set()))
    cfg = apply_overrides(ToyConfig(), [f"run.output_dir={tmp_path}", "run.name=auto", "train.steps=3",
                                        "train.mixed_precision=auto", "train.device=cpu"])
    summary = train_task(cfg, ToyTask(cfg), make_toy_data(cfg))
    assert summary["mixed_precision"] == ("bf16" if native else "no")


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_optimizer_gives_the_same_update(name):
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    grads = [torch.randn_like(p) for p in params]
    results = {}
    for fused in (False, True):
        cfg = TrainConfig(optimizer=name, lr=1e-2, weight_decay=0.1, fused_optimizer=fused)
        copies = [p.detach().clone().requires_grad_(True) for p in params]
        opt = build_optimizer(copies, cfg)
        assert bool(opt.defaults.get("fused")) is fused
        for _ in range(3):
            for p, g in zip(copies, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results[fused] = [p.detach() for p in copies]
    for a, b, p in zip(results[False], results[True], params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - p.detach()).abs().max() > 1e-3  # the parameters did move
