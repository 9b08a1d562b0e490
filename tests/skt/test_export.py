"""``vkd export skt``: a tiny SKT run (and community checkpoints, built here with random weights) exported to ONNX
and TorchScript reproduce the torch counter at sizes other than the traced one, ``vkd count --weights model.onnx``
counts images and videos as ``--run`` does, and bad input is one line with exit code 2."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from cli_helpers import run_cli, run_cli_output
from PIL import Image

from vkd.config import load_config, save_config
from vkd.errors import UserError
from vkd.skt import export
from vkd.skt.checkpoints import load_counter
from vkd.skt.config import SKTConfig
from vkd.skt.count import count_inputs
from vkd.skt.distiller import export_model
from vkd.skt.export import TRACE_SHAPE, VERIFY_SHAPES, export_counter, max_abs_difference
from vkd.skt.models import CSRNet, VGG19Regressor

pytestmark = pytest.mark.usefixtures("single_thread")

# Neither the traced size nor the sizes export_counter verifies at: the file must generalise beyond both.
OTHER_SHAPES = ((1, 3, 57, 83), (3, 3, 32, 40))
assert not {s[2:] for s in OTHER_SHAPES} & {s[2:] for s in (TRACE_SHAPE, *VERIFY_SHAPES)}
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


def _positive(model: torch.nn.Module) -> torch.nn.Module:
    """Variance-preserving random weights: clearly non-zero densities that the picture, not the biases, decides
    (so that equal outputs and counts mean something)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2.0 / (m.in_channels * m.kernel_size[0] ** 2)) ** 0.5)
                m.bias.uniform_(0.0, 0.01)
    return model.eval()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """An ``skt`` run as training leaves it: ``config.yaml`` and ``export/model.safetensors`` of a 1/8 student,
    with 64-px evaluation tiles (so that counting a 100x140 image tiles it)."""
    cfg = load_config(SKTConfig, None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=tiny",
                                        "student.width_div=8", "eval.tile_size=64"], task="skt")
    save_config(cfg, cfg.run_dir() / "config.yaml")
    export_model(_positive(CSRNet(8)), cfg.run_dir(), {"task": "skt"})
    return cfg.run_dir()


def _image(tmp_path: Path, height: int = 100, width: int = 140) -> Path:
    path = tmp_path / "crowd.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _counts(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def _one_line(capsys, *argv) -> str:
    code, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vkd: error:"), (code, err)
    return lines[0]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_run_matches_torch_at_other_sizes(run_dir, fmt, capsys):
    code, out, err = run_cli_output(capsys, "export", "skt", "--run", run_dir, "--format", fmt)
    assert code == 0, err
    path = run_dir / "export" / FILES[fmt]
    assert path.is_file() and str(path) in out and "max_abs_diff" in out
    torch_counter, exported = load_counter(run_dir), load_counter(path)
    # the conventions travel with the file
    assert (exported.family, exported.arch, exported.mean, exported.std, exported.tile_size, exported.min_size) == (
        "vkd-run", torch_counter.arch, torch_counter.mean, torch_counter.std, 64, torch_counter.min_size)
    assert exported.meta["exported_from"] == str(run_dir) and exported.source == str(path)
    with torch.inference_mode():
        reference = torch_counter.model(torch.randn(OTHER_SHAPES[0]))
    assert float(reference.sum()) > 1.0  # densities are not trivially zero
    assert max_abs_difference(torch_counter.model, exported.model, OTHER_SHAPES, seed=3) <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_count_with_exported_file_equals_count_with_run(tmp_path, run_dir, fmt, capsys):
    image = _image(tmp_path)
    out_file = tmp_path / FILES[fmt]
    assert run_cli(capsys, "export", "skt", "--run", run_dir, "--format", fmt, "--out", out_file)[0] == 0
    assert run_cli(capsys, "count", "--run", run_dir, image, "--out", tmp_path / "by_run")[0] == 0
    code, out, _ = run_cli_output(capsys, "count", "--weights", out_file, image, "--out", tmp_path / "by_file")
    assert code == 0
    assert "ONNX Runtime" in out if fmt == "onnx" else "TorchScript" in out
    by_run, by_file = _counts(tmp_path / "by_run" / "counts.csv"), _counts(tmp_path / "by_file" / "counts.csv")
    assert int(by_run[0]["tiles"]) == int(by_file[0]["tiles"]) == 6  # 100x140 in 64-px tiles
    assert float(by_run[0]["count"]) > 1.0
    assert float(by_file[0]["count"]) == pytest.approx(float(by_run[0]["count"]), abs=1e-3)


def test_video_counts_through_onnx_runtime_equal_torch(tmp_path, run_dir):
    video = tmp_path / "clip.mp4"
    writer = imageio.get_writer(video, fps=8, codec="libx264", macro_block_size=1, ffmpeg_log_level="error")
    rng = np.random.default_rng(0)
    for k in range(4):
        frame = np.zeros((48, 72, 3), np.uint8)
        frame[:, : 10 + 15 * k] = rng.integers(60, 255, (48, 10 + 15 * k, 3))  # different counts per frame
        writer.append_data(frame)
    writer.close()
    export_counter(load_counter(run_dir), tmp_path / "m.onnx", "onnx")
    for name, counter in (("torch", load_counter(run_dir)), ("ort", load_counter(tmp_path / "m.onnx"))):
        count_inputs(counter, [str(video)], tmp_path / name, overlays=False, echo=False)
    torch_counts = [float(r["count"]) for r in _counts(tmp_path / "torch" / "counts.csv")]
    ort_counts = [float(r["count"]) for r in _counts(tmp_path / "ort" / "counts.csv")]
    assert len(torch_counts) == 4 and len(set(torch_counts)) == 4
    assert ort_counts == pytest.approx(torch_counts, abs=1e-3)


def _csrnet_pytorch(path: Path) -> None:
    torch.save({"epoch": 1, "state_dict": _positive(CSRNet(16, ceil_mode=False)).state_dict()}, path)


def _c3(path: Path) -> None:
    torch.save({f"CCN.{k}": v for k, v in _positive(CSRNet(16, ceil_mode=False)).state_dict().items()}, path)


def _dm_count(path: Path) -> None:
    torch.save(_positive(VGG19Regressor((4, 8, 16, 32), (8, 4), "dm-count")).state_dict(), path)


# floor pooling, C³'s ×8 up-sampling and LOG_PARA, VGG-19's 2⌊H/16⌋ grid: the padding to vkd's ⌈H/8⌉ grid depends
# on the input size, and a traced graph must not freeze it
@pytest.mark.parametrize("family,write", [("csrnet-pytorch", _csrnet_pytorch), ("c3-framework", _c3),
                                          ("dm-count", _dm_count)])
def test_community_checkpoints_export_to_onnx(tmp_path, family, write):
    weights = tmp_path / "w.pth"
    write(weights)
    torch_counter = load_counter(weights)
    assert torch_counter.family == family
    result = export_counter(torch_counter, tmp_path / "w.onnx", "onnx")
    assert result["max_abs_diff"] <= 1e-4
    exported = load_counter(tmp_path / "w.onnx")
    assert (exported.family, exported.log_para, exported.mean) == (family, torch_counter.log_para, torch_counter.mean)
    assert max_abs_difference(torch_counter.model, exported.model, OTHER_SHAPES, seed=5) <= 1e-4
    if family == "c3-framework":  # --log-para still replaces the recorded LOG_PARA (100)
        x = torch.randn(1, 3, 40, 48)
        with torch.inference_mode():
            default, halved = exported.model(x).sum(), load_counter(tmp_path / "w.onnx", log_para=50.0).model(x).sum()
        assert float(halved) == pytest.approx(2 * float(default), rel=1e-5)


def test_bad_input_is_one_line(tmp_path, run_dir, capsys, monkeypatch):
    image = _image(tmp_path, 32, 32)
    toy = tmp_path / "toy_run"
    toy.mkdir()
    (toy / "config.yaml").write_text("task: toy\n")
    assert "not an skt or skt-teacher run" in _one_line(capsys, "export", "skt", "--run", toy)
    assert "--run RUN_DIR or --weights FILE" in _one_line(capsys, "export", "skt")

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    assert "cannot load" in _one_line(capsys, "count", "--weights", garbage, image, "--out", tmp_path / "o")
    assert "not found" in _one_line(capsys, "count", "--weights", tmp_path / "absent.onnx", image)

    plain = tmp_path / "plain.onnx"  # an ONNX file, but not vkd's: no counter metadata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of this exporter
        torch.onnx.export(CSRNet(16).eval(), (torch.zeros(1, 3, 32, 32),), str(plain), dynamo=False)
    assert "not a vkd export" in _one_line(capsys, "count", "--weights", plain, image, "--out", tmp_path / "o")

    exported = tmp_path / "m.onnx"
    assert run_cli(capsys, "export", "skt", "--run", run_dir, "--out", exported)[0] == 0
    assert "already an export" in _one_line(capsys, "export", "skt", "--weights", exported, "--out", tmp_path / "x")
    assert "C³-Framework checkpoints only" in _one_line(capsys, "count", "--weights", exported, image,
                                                        "--log-para", "50", "--out", tmp_path / "o")

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    line = _one_line(capsys, "count", "--weights", exported, image, "--out", tmp_path / "o")
    assert "onnxruntime is not installed" in line and "pip install 'vkd[onnx]'" in line
    assert "pip install 'vkd[onnx]'" in _one_line(capsys, "export", "skt", "--run", run_dir, "--out",
                                                  tmp_path / "n.onnx")
    assert not (tmp_path / "n.onnx").exists()


def test_a_failed_verification_leaves_no_file(tmp_path, run_dir, monkeypatch):
    monkeypatch.setattr(export, "VERIFY_ATOL", -1.0)  # no difference passes
    out = tmp_path / "m.pt"
    with pytest.raises(RuntimeError, match="differs from the torch model"):
        export_counter(load_counter(run_dir), out, "torchscript")
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]
    with pytest.raises(UserError, match="--format must be one of onnx, torchscript"):
        export_counter(load_counter(run_dir), out, "tflite")
