"""Kill-and-resume for every training task of the CLI (``toy`` is in test_kill_resume.py).

For each task a tiny config runs as ``python -m vkd.cli distill TASK --set ...`` in a child process that is
SIGKILLed at a random moment after its first checkpoint (a random step, plus a random fraction of a step, so
the kill can land mid-step or mid-checkpoint-write or mid-pruning) and then continued with ``--resume``. Every
checkpoint the killed process left behind must pass ``verify_checkpoint``, and the final checkpoint of the
resumed run must equal, bitwise, that of an uninterrupted run of the same config. The uninterrupted reference
runs in the test process, through the CLI's own config loading and task entry, while the child is importing
(a third child would cost 5-8 s of imports). The test and every child run single-threaded
(``OMP_NUM_THREADS=1``), so CPU float reductions are the same in all of them: every task is deterministic on
the CPU, so no tolerance is needed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vkd.engine import latest_checkpoint, list_checkpoints, load_checkpoint_weights, verify_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _distill(task: str, sets: list[str], env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    """``python -m vkd.cli distill TASK --set ...`` with stderr to ``log`` (a pipe nobody reads could fill up)."""
    args = [x for s in sets for x in ("--set", s)]
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "vkd.cli", "distill", task, *args, *extra], env=env,
                                stdout=subprocess.DEVNULL, stderr=handle)


def _steps_done(run_dir: Path) -> int:
    """Highest step logged in metrics.jsonl (log_every=1) or checkpointed so far."""
    best = 0
    found = list_checkpoints(run_dir / "checkpoints")
    if found:
        best = found[-1][0]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                best = max(best, int(json.loads(line).get("step", 0)))
            except ValueError:  # a line being written right now
                pass
    return best


def _run_in_process(task: str, sets: list[str]) -> Path:
    """The uninterrupted reference, through the CLI's own config loading and task entry (no child process: the
    imports alone cost a child 5-8 s on a loaded 2-core machine)."""
    from vkd.cli import _load_task_config

    threads = torch.get_num_threads()
    try:
        entry, cfg = _load_task_config(task, None, sets)
        summary = entry.run(cfg, None)
    finally:
        torch.set_num_threads(threads)
    assert summary["status"] == "finished"
    return cfg.run_dir()


def _kill_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, steps: int, seed: int,
                                 report: dict) -> None:
    """Wait for the first checkpoint, then SIGKILL ``proc`` at a random later step plus a random delay."""
    rng = random.Random(seed)
    deadline = time.time() + 240
    try:
        while not list_checkpoints(run_dir / "checkpoints") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        first = list_checkpoints(run_dir / "checkpoints")
        if not first:
            report["error"] = "no checkpoint was written before the process ended"
            return
        # kill during step target+1 (or while its checkpoint is written); the last quarter is left as a margin so
        # that a fast task cannot finish between the poll and the kill
        target = rng.randint(first[0][0], max(first[0][0], steps - max(2, steps // 4)))
        while _steps_done(run_dir) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        report["target"] = target
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None and "target" not in report:
            proc.kill()


def kill_and_resume(tmp_path: Path, task: str, sets: list[str], steps: int, env: dict[str, str]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[Path]]:
    """Reference run (in process) and killed + resumed run (children), each in its own output directory (the
    runs never share a cache or a generated data set while they are being written).

    Returns:
        (reference weights, resumed weights, [reference checkpoint, resumed checkpoint]).
    """
    def sets_for(out: Path) -> list[str]:  # "{out}" in a value: this run's own output directory
        return [f"run.output_dir={out}", "run.name=r", f"train.steps={steps}", "train.log_every=1",
                *(x.replace("{out}", str(out)) for x in sets)]

    run_dir = tmp_path / "killed" / task / "r"
    # a new kill moment every run; VKD_KILL_SEED=<seed from a failure message> replays the same target step
    seed = int(os.environ.get("VKD_KILL_SEED", random.SystemRandom().randrange(2**32)))
    killed = _distill(task, sets_for(tmp_path / "killed"), env, tmp_path / "killed.log")
    report: dict = {}
    # the child spends its first seconds importing: run the reference meanwhile, and kill from a thread
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(killed, run_dir, steps, seed, report))
    killer.start()
    try:
        reference = _run_in_process(task, sets_for(tmp_path / "reference"))
    finally:
        killer.join(timeout=300)
        if killed.poll() is None and killer.is_alive():
            killed.kill()
    killed.wait(timeout=60)
    err = (tmp_path / "killed.log").read_text()
    where = f"(VKD_KILL_SEED={seed}, kill during step {report.get('target', -1) + 1})"
    assert "error" not in report, f"{report['error']} {where}: {err}"
    assert killed.returncode == -signal.SIGKILL, f"the run ended before it was killed {where}; make it longer: {err}"
    left = list_checkpoints(run_dir / "checkpoints")
    assert left and left[-1][0] < steps
    for _, path in left:  # nothing the killed process left behind is corrupt
        verify_checkpoint(path)
    print(f"{task}: killed {where}; checkpoints left: {[s for s, _ in left]}")

    resumed = _distill(task, sets_for(tmp_path / "killed"), env, tmp_path / "resumed.log", "--resume")
    assert resumed.wait(timeout=300) == 0, f"{where}: {(tmp_path / 'resumed.log').read_text()}"
    ref_ckpt, res_ckpt = latest_checkpoint(reference), latest_checkpoint(run_dir)
    assert ref_ckpt.name == res_ckpt.name == f"checkpoint-{steps}"
    for _, path in list_checkpoints(run_dir / "checkpoints"):
        verify_checkpoint(path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"].endswith(left[-1][1].name)
    return load_checkpoint_weights(ref_ckpt), load_checkpoint_weights(res_ckpt), [ref_ckpt, res_ckpt]


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = {k: (f"shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}" if a[k].shape != b[k].shape
                else float((a[k].double() - b[k].double()).abs().max()))
            for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])}
    assert not diff, f"resumed run differs from the uninterrupted one: {diff}"


def assert_same_files(ref_ckpt: Path, res_ckpt: Path, name: str) -> None:
    if (ref_ckpt / name).is_file() or (res_ckpt / name).is_file():
        assert_bitwise(load_checkpoint_weights(ref_ckpt, name), load_checkpoint_weights(res_ckpt, name))


# ------------------------------------------------------------------------------------------------------------
# Per-task tiny configs
# ------------------------------------------------------------------------------------------------------------


def test_boot_teacher(tmp_path):
    sets = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "data.size=8", "train.batch_size=8",
            "train.checkpoint_every=4", "train.keep_last=2", "train.ema_decay=0.9", "train.warmup_steps=2",
            "train.sample_every=0", "sample.num=4", "sample.teacher_steps=2", "train.device=cpu"]
    ref, res, (rc, sc) = kill_and_resume(tmp_path, "boot-teacher", sets, 40, _env())
    assert_bitwise(ref, res)
    assert_same_files(rc, sc, "ema.safetensors")


def test_boot_text_teacher(tmp_path):
    sets = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.attention_head_dim=4",
            "text_encoder.hidden_size=16", "text_encoder.intermediate_size=32", "text_encoder.num_layers=1",
            "data.size=8", "train.batch_size=8", "train.checkpoint_every=4", "train.keep_last=2",
            "train.ema_decay=0.9", "train.warmup_steps=2", "train.sample_every=0", "sample.num=4",
            "sample.teacher_steps=2", "train.device=cpu"]
    ref, res, (rc, sc) = kill_and_resume(tmp_path, "boot-text-teacher", sets, 40, _env())
    assert_bitwise(ref, res)
    assert_same_files(rc, sc, "ema.safetensors")


def _tiny_boot_teacher(path: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    from vkd.boot.teacher import save_teacher

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=4)
    return save_teacher(unet, DDPMScheduler(prediction_type="epsilon", clip_sample=False), path,
                        {"dataset": "test", "num_classes": 3, "null_class": 3})


def test_boot(tmp_path):
    teacher = _tiny_boot_teacher(tmp_path / "teacher")
    sets = [f"teacher.path={teacher}", "train.batch_size=4", "train.checkpoint_every=4", "train.keep_last=2",
            "train.device=cpu", "train.lr=1e-3", "sample.num=4", "sample.teacher_steps=2", "eval.num_samples=0"]
    ref, res, _ = kill_and_resume(tmp_path, "boot", sets, 40, _env())
    assert_bitwise(ref, res)


# A text-aligned stand-in teacher for Feature 3DGS, imported through teacher.target like a user's plug-in (the
# child finds it on PYTHONPATH).
F3D_STUB = '''
import torch
import torch.nn.functional as F


class Teacher:
    def __call__(self, images):
        return F.normalize(F.avg_pool2d(images, 4), dim=1)

    def encode_text(self, prompts):
        return F.normalize(torch.ones(len(prompts), 3), dim=1)


teacher = Teacher()
'''


def test_feature3dgs(tmp_path, monkeypatch):
    (tmp_path / "kr_f3d_teacher.py").write_text(F3D_STUB)
    monkeypatch.syspath_prepend(str(tmp_path))
    # densification (refine_every=4 from step 4 to 24) changes the number of Gaussians between checkpoints, so
    # resuming also has to restore the densification statistics and the resized optimizer state
    sets = ["data.synthetic.num_views=8", "data.synthetic.resolution=24", "data.synthetic.supersample=1",
            "data.synthetic.num_points=200", "data.test_every=4", "teacher.kind=callable",
            "teacher.target=kr_f3d_teacher:teacher", "model.render_dim=4", "model.sh_degree=0",
            "train.checkpoint_every=4", "train.keep_last=0", "densify.refine_start=4", "densify.refine_every=4",
            "densify.refine_stop=24", "eval.fps_repeats=1", "compute.cpu_threads=1"]
    ref, res, _ = kill_and_resume(tmp_path, "feature3dgs", sets, 32, _env(tmp_path))
    assert_bitwise(ref, res)


HELLO_DATA = ["model.width=8", "model.depth=2"]


def test_hello_teacher(tmp_path):
    # weak-teacher snapshots at steps 5, 10, ..., 40: the kill always lands after at least one of them, and
    # the resumed run must write the same files and keep the earlier snapshots' accuracies in teacher.json
    sets = [*HELLO_DATA, "extra.num_snapshots=8", "train.batch_size=16", "train.checkpoint_every=5",
            "train.keep_last=2"]
    ref, res, (rc, sc) = kill_and_resume(tmp_path, "hello-teacher", sets, 40, _env())
    assert_bitwise(ref, res)
    snaps = sorted(p.name for p in (rc.parents[1] / "teachers").glob("*.safetensors"))
    assert snaps == sorted(p.name for p in (sc.parents[1] / "teachers").glob("*.safetensors"))
    for name in snaps:
        assert_bitwise(load_checkpoint_weights(rc.parents[1] / "teachers" / name),
                       load_checkpoint_weights(sc.parents[1] / "teachers" / name))
    # teacher.json keeps the accuracies of the snapshots written before the kill
    ref_meta, res_meta = (json.loads((c.parents[1] / "teacher.json").read_text()) for c in (rc, sc))
    assert len(ref_meta["snapshot_test_acc"]) == 8
    assert res_meta["snapshot_test_acc"] == ref_meta["snapshot_test_acc"]
    assert res_meta["test_acc"] == ref_meta["test_acc"]


@pytest.fixture(scope="module")
def hello_teacher_run(tmp_path_factory):
    from vkd.cli import _load_task_config

    out = tmp_path_factory.mktemp("hello_teacher")
    torch.set_num_threads(1)
    entry, cfg = _load_task_config("hello-teacher", None, [
        f"run.output_dir={out}", *HELLO_DATA, "extra.num_snapshots=2", "train.steps=10", "train.batch_size=16"])
    entry.run(cfg, None)
    return cfg.run_dir()


def test_hello(tmp_path, hello_teacher_run):
    sets = [f"teacher.run={hello_teacher_run}", "clip.cache_dir={out}/clip", "clip.tiny.width=16",
            "clip.tiny.layers=1", "clip.tiny.heads=2", "clip.tiny.text_width=16", "clip.tiny.text_heads=2",
            "clip.tiny.embed_dim=16", "clip.tiny.steps=4", "clip.tiny.batch_size=16", "train.batch_size=16",
            "train.checkpoint_every=4", "train.keep_last=2", "selection.ipc=1", "selection.mipc=4",
            "image_update.steps=2", "student.steps=2", "student.model.width=8"]
    ref, res, _ = kill_and_resume(tmp_path, "hello", sets, 24, _env())
    assert_bitwise(ref, res)


SKT_DATA = ["data.root={out}/crowds", "data.synthetic.num_train=8", "data.synthetic.num_test=2",
            "data.synthetic.height=32", "data.synthetic.width=32", "data.synthetic.count_min=2",
            "data.synthetic.count_max=20", "data.synthetic.min_person=8", "data.crop=fixed", "data.crop_size=24",
            "data.flip_prob=0.5", "train.batch_size=2", "train.warmup_steps=2", "train.checkpoint_every=3",
            "train.keep_last=2", "eval.tile_size=0"]


def test_skt_teacher(tmp_path):
    # random crops and flips come from the per-step reseeded global RNG: they must repeat after a resume
    sets = [*SKT_DATA, "model.width_div=4"]
    ref, res, _ = kill_and_resume(tmp_path, "skt-teacher", sets, 16, _env())
    assert_bitwise(ref, res)


def test_skt(tmp_path):
    from safetensors.torch import save_file

    from vkd.skt.models import CSRNet

    torch.manual_seed(0)
    teacher = CSRNet(4)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    sets = [*SKT_DATA, f"teacher.run={tmp_path / 'teacher.safetensors'}", "teacher.width_div=4"]
    ref, res, _ = kill_and_resume(tmp_path, "skt", sets, 16, _env())
    assert_bitwise(ref, res)
