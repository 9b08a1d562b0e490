"""Epoch-based student schedule and the weak-teacher accuracy filter."""

import json

import pytest
import torch

from vkd.cli import main
from vkd.config import apply_overrides
from vkd.errors import ConfigError
from vkd.hello.config import ClassifierConfig, HelloConfig, StudentConfig
from vkd.hello.data import load_split
from vkd.hello.evaluate import student_steps, student_views, train_student
from vkd.hello.model import build_classifier
from vkd.hello.teacher import resolve_teachers, save_teacher, select_snapshots


@pytest.mark.parametrize("n,batch,epochs,steps", [(100, 100, 300, 300), (1000, 100, 300, 3000), (250, 100, 3, 9),
                                                  (7, 100, 5, 5), (10, 3, 2, 8)])
def test_epochs_to_steps(n, batch, epochs, steps):
    cfg = StudentConfig(epochs=epochs, batch_size=batch)
    assert student_steps(cfg, n) == steps
    assert student_views(cfg, n) == epochs * n  # every epoch sees every image once
    assert student_steps(StudentConfig(steps=123, batch_size=batch), n) == 123  # epochs=0: steps as given


def test_student_trains_for_whole_epochs():
    seen: list[int] = []

    def label_fn(x):
        seen.append(x.shape[0])
        return torch.zeros(x.shape[0], 3)

    cfg = StudentConfig(model=ClassifierConfig(width=4, depth=1), epochs=3, batch_size=10, crop_scale_min=1.0)
    images, labels = torch.rand(25, 3, 8, 8), torch.arange(25) % 3
    train_student(images, labels, 3, cfg, label_fn)
    assert seen == [10, 10, 5] * 3  # 3 epochs × ceil(25 / 10) steps, the remainder in each epoch's last batch
    # uint8 images train on the same float views as their /255 float copy
    u8 = (images * 255).round().to(torch.uint8)
    a = train_student(u8, labels, 3, cfg, None, seed=1)
    b = train_student(u8.float() / 255, labels, 3, cfg, None, seed=1)
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def _teacher_run(root, accs):
    """A hello-teacher run whose snapshots have distinct weights and the recorded test accuracies ``accs``."""
    cfg = ClassifierConfig(width=4, depth=1)
    steps = [10 * (i + 1) for i in range(len(accs))]
    for i, step in enumerate(steps):
        torch.manual_seed(i)
        save_teacher(build_classifier(cfg, 10, 16), root / "teachers" / f"teacher-step{step}.safetensors", {})
    save_teacher(build_classifier(cfg, 10, 16), root / "teacher.safetensors", {})
    names = list(load_split(HelloConfig().data, "train").class_names)
    meta = {"num_classes": 10, "class_names": names, "image_size": 16, "model": cfg.__dict__,
            "snapshot_test_acc": {str(s): a for s, a in zip(steps, accs, strict=True)}}
    (root / "teacher.json").write_text(json.dumps(meta))
    return steps


def test_min_snapshot_accuracy_skips_weak_teachers(tmp_path):
    steps = _teacher_run(tmp_path / "t", [0.33, 0.6, 0.2, 0.9])
    train = load_split(HelloConfig().data, "train")
    x = torch.rand(4, 3, 16, 16)
    cfg = apply_overrides(HelloConfig(), [f"teacher.run={tmp_path / 't'}", "teacher.min_snapshot_accuracy=0.5"])
    fit, _, meta = resolve_teachers(cfg, train)
    all_fit, _, _ = resolve_teachers(apply_overrides(cfg, ["teacher.min_snapshot_accuracy=0"]), train)
    assert len(fit) == 2 and len(all_fit) == 4
    with torch.no_grad():  # the kept teachers are the 0.6 and 0.9 snapshots, in trajectory order
        for kept, full in zip(fit, (all_fit[1], all_fit[3]), strict=True):
            torch.testing.assert_close(kept(x), full(x))
    assert [r["used"] for r in meta["fit_snapshots"]] == [False, True, False, True]
    assert [r["step"] for r in meta["fit_snapshots"]] == steps
    # the index selection applies first, the filter to what it selected
    keep, _ = select_snapshots([f"teacher-step{s}.safetensors" for s in steps],
                               {str(s): a for s, a in zip(steps, [0.33, 0.6, 0.2, 0.9], strict=True)}, [0, 1, 2], 0.5)
    assert keep == [1]
    with pytest.raises(ConfigError, match="no weak-teacher snapshot .* reaches .*0.95 \\(best 0.900\\)"):
        resolve_teachers(apply_overrides(cfg, ["teacher.min_snapshot_accuracy=0.95"]), train)


def test_min_snapshot_accuracy_out_of_range_and_unreachable_exit_2(tmp_path, capsys):
    _teacher_run(tmp_path / "t", [0.3, 0.4])
    base = ["distill", "hello", "--set", f"run.output_dir={tmp_path}", "--set", f"teacher.run={tmp_path / 't'}"]
    assert main(base + ["--set", "teacher.min_snapshot_accuracy=1.5"]) == 2
    assert "must be in [0, 1]" in capsys.readouterr().err
    code = main(base + ["--set", "teacher.min_snapshot_accuracy=0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no weak-teacher snapshot" in err[0]
