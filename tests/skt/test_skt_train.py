"""End to end on tiny synthetic crowds: teacher training, SKT distillation, eval and count commands."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from vkd.config import load_config
from vkd.errors import UserError
from vkd.registry import get_task
from vkd.skt.commands import count, evaluate, run_skt
from vkd.skt.config import SKTConfig, SKTTeacherConfig
from vkd.skt.datasets import build_train_dataset
from vkd.skt.distiller import SKTTask
from vkd.skt.models import count_parameters
from vkd.skt.runs import RUN_EXPORT

SKT, SKT_TEACHER = get_task("skt"), get_task("skt-teacher")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Density maps of these throw-away data sets go to the test's own cache root, not the user's."""
    monkeypatch.setenv("VKD_CACHE_DIR", str(tmp_path / "vkd-cache"))


def _tiny(tmp_path, steps):
    return [f"run.output_dir={tmp_path / 'runs'}", "run.name=tiny", f"data.root={tmp_path / 'syn'}",
            "data.synthetic.num_train=16", "data.synthetic.num_test=6", "data.synthetic.height=32",
            "data.synthetic.width=32", "data.synthetic.count_min=2", "data.synthetic.count_max=40",
            "data.synthetic.min_person=8",
            "data.crop=none", "data.flip_prob=0.5", f"train.steps={steps}", "train.batch_size=4", "train.lr=3e-4",
            "train.warmup_steps=2",
            "train.log_every=2", "train.checkpoint_every=1000", "eval.tile_size=0"]


def test_teacher_then_skt_lowers_student_mae(tmp_path):
    torch.manual_seed(0)
    # A 1/2-width teacher keeps the test fast; the SKT code is the same for any teacher width.
    t_cfg = load_config(SKTTeacherConfig, None, _tiny(tmp_path, 12) + ["model.width_div=2"], task="skt-teacher")
    t_summary = SKT_TEACHER.run(t_cfg, None)
    t_dir = t_cfg.run_dir()
    assert (t_dir / RUN_EXPORT).is_file() and "mae" in t_summary["eval"]

    s_cfg = load_config(SKTConfig, None, _tiny(tmp_path, 30) + ["train.lr=1e-3"], task="skt")
    assert s_cfg.teacher.run == ""  # found at <output_dir>/skt-teacher/<run.name>
    from vkd.skt.datasets import build_eval_sets as _eval_sets
    from vkd.skt.teacher import load_teacher

    task = SKTTask(s_cfg, load_teacher(s_cfg), _eval_sets(s_cfg))
    before = task.evaluate(0)
    from vkd.engine import train_task

    summary = train_task(s_cfg, task, build_train_dataset(s_cfg.data),
                         collate_fn=__import__("vkd.skt.datasets", fromlist=["pad_collate"]).pad_collate)
    after = summary["eval"]
    assert after["mae"] < before["mae"]
    assert after["teacher_mae"] == pytest.approx(before["teacher_mae"])  # the teacher stays frozen
    records = [json.loads(line) for line in (s_cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss_cos" in r]
    assert train[-1]["loss_cos"] < train[0]["loss_cos"] and train[-1]["loss_fsp"] < train[0]["loss_fsp"]

    # The exported student has no adapters: exactly the 1/4 CSRNet's parameters.
    from safetensors.torch import load_file

    exported = load_file(str(s_cfg.run_dir() / RUN_EXPORT))
    assert sum(v.numel() for v in exported.values()) == 1_017_681 == count_parameters(task.student)
    assert not any("adapter" in k for k in exported)

    metrics = evaluate(s_cfg.run_dir(), [], tmp_path / "eval_out")
    assert metrics["mae"] == pytest.approx(after["mae"], rel=1e-4)
    assert (tmp_path / "eval_out" / "eval.json").is_file()

    images = [str(p) for p in sorted((tmp_path / "syn" / "test").glob("*.png"))[:2]]
    result = count(s_cfg.run_dir(), images + [str(tmp_path / "syn" / "test")], tmp_path / "counted")
    assert result["images"] == 2 + 6
    rows = list(csv.DictReader(open(tmp_path / "counted" / "counts.csv")))
    assert len(rows) == 8 and sum(float(r["count"]) for r in rows) == pytest.approx(result["total"], abs=1e-2)
    assert len(list((tmp_path / "counted").glob("*_density.png"))) == 8


def test_no_transfer_baseline_needs_no_teacher(tmp_path):
    cfg = load_config(SKTConfig, None, _tiny(tmp_path, 2) + ["loss.teacher_weight=0", "loss.cos_weight=0",
                                                             "loss.fsp_weight=0"], task="skt")
    summary = run_skt(cfg)
    assert summary["steps"] == 2 and "teacher_mae" not in summary["eval"]


def test_missing_teacher_is_a_user_error(tmp_path):
    cfg = load_config(SKTConfig, None, _tiny(tmp_path, 2), task="skt")
    with pytest.raises(UserError, match="skt-teacher"):
        run_skt(cfg)


def test_count_on_large_image_tiles(tmp_path):
    import numpy as np
    from PIL import Image

    t_cfg = load_config(SKTTeacherConfig, None, _tiny(tmp_path, 1) + ["model.width_div=4", "eval.tile_size=64"],
                        task="skt-teacher")
    SKT_TEACHER.run(t_cfg, None)
    img = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200), dtype=np.uint8), "L").save(img)
    result = count(t_cfg.run_dir(), [str(img)], None)
    row = next(csv.DictReader(open(t_cfg.run_dir() / "count" / "counts.csv")))
    assert int(row["tiles"]) == (150 // 64 + 1) * (200 // 64 + 1) and result["images"] == 1
    with pytest.raises(UserError, match="not found"):
        count(t_cfg.run_dir(), [str(tmp_path / "nope.png")], None)


def test_task_entries_and_presets():
    from vkd.config import find_preset

    assert SKT.preset_dir == SKT_TEACHER.preset_dir == "skt"
    for name, cls, task in (("synthetic-teacher", SKTTeacherConfig, "skt-teacher"), ("synthetic", SKTConfig, "skt"),
                            ("shanghaitech-a-teacher", SKTTeacherConfig, "skt-teacher"),
                            ("shanghaitech-a", SKTConfig, "skt"), ("ucf-qnrf", SKTConfig, "skt")):
        cfg = load_config(cls, find_preset("skt", name), [], task=task)
        assert cfg.task == task
    sha = load_config(SKTConfig, find_preset("skt", "shanghaitech-a"), [], task="skt")
    assert sha.train.batch_size == 1 and sha.train.lr == 1e-4 and sha.loss.cos_weight == 0.5
    assert sha.loss.reduction == "sum" and sha.train.scheduler == "constant" and sha.data.crop == "ratio"
    # Real-data teachers train as CSRNet-pytorch: whole images (its crop and flip are disabled), batch 1, SGD 1e-7;
    # the SKT students keep SKT's random crops U(0.5, 1) and flips.
    for name in ("shanghaitech-a", "shanghaitech-b", "ucf-qnrf"):
        teacher = load_config(SKTTeacherConfig, find_preset("skt", f"{name}-teacher"), [], task="skt-teacher")
        assert teacher.data.crop == "none" and teacher.data.flip_prob == 0.0 and teacher.train.batch_size == 1
        assert teacher.train.optimizer == "sgd" and teacher.train.lr == 1e-7 and teacher.train.momentum == 0.95
        student = load_config(SKTConfig, find_preset("skt", name), [], task="skt")
        assert student.data.crop == "ratio" and tuple(student.data.crop_ratio) == (0.5, 1.0)
        assert student.data.flip_prob == 0.2 and student.train.batch_size == 1
    # The embedded-default presets spell out the dataclass defaults.
    assert load_config(SKTConfig, find_preset("skt", "synthetic"), [], task="skt") == load_config(SKTConfig, None, [], task="skt")
    assert (load_config(SKTTeacherConfig, find_preset("skt", "synthetic-teacher"), [], task="skt-teacher")
            == load_config(SKTTeacherConfig, None, [], task="skt-teacher"))


@pytest.mark.parametrize(("precision", "native", "expected"), [
    ("fp32", True, torch.float32), ("bf16", False, torch.bfloat16),
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32)])
def test_teacher_precision_only_changes_the_frozen_teachers_forward(monkeypatch, precision, native, expected):
    import vkd.engine.precision as precision_module
    from vkd.config import apply_overrides
    from vkd.skt.models import CSRNet

    monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
    cfg = apply_overrides(SKTConfig(), [f"teacher.precision={precision}"])
    torch.manual_seed(0)
    teacher = CSRNet(2)
    teacher_dtypes, student_dtypes = [], []
    teacher.frontend[0].register_forward_hook(lambda m, i, o: teacher_dtypes.append(o.dtype))
    task = SKTTask(cfg, teacher)
    task.student.frontend[0].register_forward_hook(lambda m, i, o: student_dtypes.append(o.dtype))
    batch = {"image": torch.rand(2, 3, 32, 32), "density": torch.rand(2, 1, 4, 4), "count": torch.rand(2)}
    out = task(batch)
    assert teacher_dtypes == [expected] and student_dtypes == [torch.float32]
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in task.student.parameters())
    assert all(p.grad is None for p in task.teacher.parameters())
    # bf16 teacher features are close to fp32 ones: the loss moves by far less than its size
    reference = SKTTask(apply_overrides(SKTConfig(), ["teacher.precision=fp32"]), teacher)
    reference.student.load_state_dict(task.student.state_dict())
    reference.adapters.load_state_dict(task.adapters.state_dict())
    with torch.no_grad():
        assert float(reference(batch)["loss"]) == pytest.approx(float(out["loss"]), rel=0.05)


def test_val_fraction_carves_validation_from_train_and_selects_the_best_by_val_mae(tmp_path):
    """data.val_fraction holds out training images (disjoint, never the test split); train.select_best=val_mae
    keeps best/, whose weights are the export that vkd eval / count read."""
    from vkd.engine import load_checkpoint_weights, read_best
    from vkd.skt.datasets import build_eval_sets, split_train_records

    sets = _tiny(tmp_path, 6) + ["model.width_div=4", "data.val_fraction=0.25", "train.checkpoint_every=2",
                                  "train.keep_last=0", "train.select_best=val_mae"]
    cfg = load_config(SKTTeacherConfig, None, sets, task="skt-teacher")
    _, train, val = split_train_records(cfg.data)
    names = lambda records: {r.image_path.name for r in records}  # noqa: E731
    assert len(val) == 4 and len(train) == 12 and not names(train) & names(val)
    assert len(build_train_dataset(cfg.data).records) == 12
    eval_sets = build_eval_sets(cfg)
    assert names(eval_sets["val"].records) == names(val)
    assert not names(eval_sets["test"].records) & names(val)

    summary = get_task("skt-teacher").run.resolve()(cfg, None)
    run = tmp_path / "runs" / "skt-teacher" / "tiny"
    best = read_best(run)
    assert best["metric"] == "val_mae" and summary["best"]["step"] == best["step"] in (2, 4, 6)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val/val_mae"] for r in lines if "val/val_mae" in r}
    assert sorted(vals) == [2, 4, 6] and best["value"] == min(vals.values())
    exported = load_checkpoint_weights(run / RUN_EXPORT)
    best_weights = load_checkpoint_weights(run / "best")
    assert all(torch.equal(v, best_weights[f"model.{k}"]) for k, v in exported.items())

    bad = load_config(SKTTeacherConfig, None, _tiny(tmp_path, 1) + ["data.val_fraction=16"], task="skt-teacher")
    with pytest.raises(UserError, match="data.val_fraction=16 takes 16 of the 16 training items"):
        build_train_dataset(bad.data)


def test_skt_transfer_terms_reach_the_students_gradients():
    """The intra-layer (cosine) and inter-layer (FSP) transfer terms each put a gradient on the student: backward of
    the term alone reaches every student conv up to the layers it reads (cosine: up to the last tap; FSP: the
    density too, so every conv), and setting the term's weight to 0 changes the student's total gradient. Fails if
    a term is detached, dropped from the sum or skipped."""
    from torch import nn

    from vkd.config import apply_overrides
    from vkd.skt.models import CSRNet

    torch.manual_seed(0)
    teacher = CSRNet(2)  # any width: the adapters map the student's taps to it
    batch = {"image": torch.rand(2, 3, 32, 32), "density": torch.rand(2, 1, 4, 4), "count": torch.rand(2)}

    def task_with(*sets: str) -> SKTTask:
        torch.manual_seed(1)  # the same student and adapters for every weighting
        return SKTTask(apply_overrides(SKTConfig(), ["teacher.precision=fp32", *sets]), teacher)

    def student_grads(task: SKTTask) -> dict[str, torch.Tensor]:
        return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                for name, p in task.student.named_parameters()}

    task = task_with()
    convs = [name for name, m in task.student.named_modules() if isinstance(m, nn.Conv2d)]
    # the cosine term reads the six taps; the last is backend[7], so backend[8], backend[10] and the output come after
    after_last_tap = {"backend.8", "backend.10", "output_layer"}
    assert after_last_tap < set(convs)
    for term, reached in (("cos", [c for c in convs if c not in after_last_tap]), ("fsp", convs)):
        task.zero_grad(set_to_none=True)
        out = task(batch)
        assert float(out[f"loss_{term}"].detach()) > 0 and out[f"loss_{term}"].requires_grad
        out[f"loss_{term}"].backward()
        grads = student_grads(task)
        norms = {c: float(grads[f"{c}.weight"].norm()) for c in convs}
        assert all(norms[c] > 0 for c in reached), (term, norms)
        assert all(p.grad is None for p in task.teacher.parameters())
        assert all(float(p.grad.norm()) > 0 for p in task.adapters.parameters())  # adapters train through the term

    full = task_with()
    full(batch)["loss"].backward()
    with_all = student_grads(full)
    for term in ("cos", "fsp"):
        ablated = task_with(f"loss.{term}_weight=0")
        out = ablated(batch)
        assert float(out[f"loss_{term}"]) == 0.0  # skipped at weight 0
        out["loss"].backward()
        without = student_grads(ablated)
        change = sum(float((with_all[k] - without[k]).norm()) for k in with_all)
        assert change > 1e-6 * sum(float(v.norm()) for v in with_all.values()), term
