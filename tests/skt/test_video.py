"""``vkd count`` on videos: streamed frames, ``--every`` / ``--max-side``, counts.csv rows, the overlay video, and
failures (undecodable file, decoding error mid-video, zero-size frames) that keep the counts made before them."""

from __future__ import annotations

import csv
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from vkd.cli import main
from vkd.skt.count import CSV_COLUMNS
from vkd.skt.models import CSRNet

FRAMES, VH, VW = 12, 48, 64


@pytest.fixture
def weights(tmp_path) -> Path:
    """A CSRNet-pytorch-layout 1/4 student whose counts vary with the picture."""
    torch.manual_seed(0)
    model = CSRNet(4, ceil_mode=False)
    with torch.no_grad():  # variance-preserving weights: the picture, not the biases, decides the count
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2.0 / (m.in_channels * m.kernel_size[0] ** 2)) ** 0.5)
                m.bias.zero_()
    path = tmp_path / "student.pth.tar"
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "best_prec1": 70.0}, path)
    return path


@pytest.fixture
def video(tmp_path) -> Path:
    """12 frames of 64x48 (H.264 through imageio-ffmpeg) whose content changes frame to frame."""
    rng = np.random.default_rng(0)
    path = tmp_path / "crowd.mp4"
    writer = imageio.get_writer(path, fps=12, codec="libx264", macro_block_size=1, ffmpeg_log_level="error")
    for k in range(FRAMES):
        frame = np.zeros((VH, VW, 3), np.uint8)
        frame[:, : 4 + 5 * k] = rng.integers(60, 255, (VH, 4 + 5 * k, 3))  # more texture in later frames
        writer.append_data(frame)
    writer.close()
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("vkd: error:") and "Traceback" not in err[0], err
    return err[0]


def test_video_counts_every_nth_frame_like_the_same_frames_as_images(tmp_path, weights, video, capsys):
    out = tmp_path / "out"
    assert main(["count", "--weights", str(weights), str(video), "--every", "2", "--max-side", "32",
                 "--out", str(out)]) == 0
    assert "6 frames" in capsys.readouterr().out
    with open(out / "counts.csv", newline="") as handle:
        assert tuple(next(csv.reader(handle))) == CSV_COLUMNS
    rows = _rows(out / "counts.csv")
    assert [int(r["frame"]) for r in rows] == [0, 2, 4, 6, 8, 10]
    assert [float(r["time_s"]) for r in rows] == pytest.approx([k / 12 for k in (0, 2, 4, 6, 8, 10)], abs=1e-3)
    assert {(r["width"], r["height"]) for r in rows} == {("32", "24")}  # --max-side 32 of 64x48
    overlay = Path(rows[0]["overlay"])
    assert overlay == out / "crowd_density.mp4"
    reader = imageio.get_reader(overlay)
    overlay_frames = [f for f in reader]
    assert len(overlay_frames) == 6 and overlay_frames[0].shape == (24, 32, 3)
    assert reader.get_meta_data()["fps"] == pytest.approx(6.0)  # 12 fps / every 2: same duration

    # the same frames, decoded by the same ffmpeg, saved losslessly and counted as images
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for k, frame in enumerate(imageio.get_reader(video)):
        if k % 2 == 0:
            Image.fromarray(frame).save(frames_dir / f"f{k:02d}.png")
    assert main(["count", "--weights", str(weights), str(frames_dir), "--max-side", "32",
                 "--out", str(tmp_path / "img_out")]) == 0
    image_counts = [float(r["count"]) for r in _rows(tmp_path / "img_out" / "counts.csv")]
    video_counts = [float(r["count"]) for r in rows]
    assert video_counts == pytest.approx(image_counts, abs=1e-5)
    assert len(set(video_counts)) == 6  # the frames differ, and so do their counts


def test_undecodable_video_is_one_line_exit_2(tmp_path, weights, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01garbage, not a video" * 50)
    line = _one_line_error(capsys, ["count", "--weights", str(weights), str(bad), "--out", str(tmp_path / "o")])
    assert "cannot decode video" in line and "broken.mp4" in line
    missing = _one_line_error(capsys, ["count", "--weights", str(weights), str(tmp_path / "none.mp4")])
    assert "video not found" in missing


def _failing_reader(fail_at: int, payload: bytes | None = None, size: tuple[int, int] | None = None):
    """``imageio_ffmpeg.read_frames`` that raises (or, with ``payload``, yields it) at frame ``fail_at``."""
    real = imageio_ffmpeg.read_frames

    def read_frames(path, *args, **kwargs):
        frames = real(path, *args, **kwargs)
        meta = next(frames)
        if size is not None:
            meta = {**meta, "size": size}
        yield meta
        for k, data in enumerate(frames):
            if k == fail_at:
                frames.close()
                if payload is None:
                    raise OSError("ffmpeg: Invalid NAL unit size\nerror while decoding MB 3 2")
                yield payload
                return
            yield data

    return read_frames


def test_failure_mid_video_keeps_the_counts_before_it(tmp_path, weights, video, capsys, monkeypatch):
    monkeypatch.setattr(imageio_ffmpeg, "read_frames", _failing_reader(5))
    out = tmp_path / "out"
    line = _one_line_error(capsys, ["count", "--weights", str(weights), str(video), "--out", str(out)])
    assert "decoding failed at frame 5" in line and "error while decoding MB 3 2" in line
    assert "5 counts computed before it" in line
    rows = _rows(out / "counts.csv")
    assert [int(r["frame"]) for r in rows] == [0, 1, 2, 3, 4]
    monkeypatch.undo()  # imageio's own reader goes through read_frames too
    assert sum(1 for _ in imageio.get_reader(out / "crowd_density.mp4")) == 5  # closed cleanly: playable


def test_images_before_a_failing_video_stay_in_the_csv(tmp_path, weights, video, capsys, monkeypatch):
    image = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    monkeypatch.setattr(imageio_ffmpeg, "read_frames", _failing_reader(3, payload=b""))  # a frame of zero bytes
    out = tmp_path / "out"
    line = _one_line_error(capsys, ["count", "--weights", str(weights), str(image), str(video), "--every", "2",
                                    "--out", str(out)])
    assert "frame 3 has 0 bytes" in line
    rows = _rows(out / "counts.csv")
    assert [(Path(r["source"]).name, r["frame"]) for r in rows] == [("a.png", ""), ("crowd.mp4", "0"),
                                                                    ("crowd.mp4", "2")]


def test_zero_size_video_and_frames(tmp_path, weights, video, capsys, monkeypatch):
    monkeypatch.setattr(imageio_ffmpeg, "read_frames", _failing_reader(99, size=(0, 0)))
    line = _one_line_error(capsys, ["count", "--weights", str(weights), str(video), "--out", str(tmp_path / "o")])
    assert "zero size (0x0)" in line
    # a frame that decodes to nothing after resizing below the network's minimum
    monkeypatch.undo()
    line = _one_line_error(capsys, ["count", "--weights", str(weights), str(video), "--max-side", "4",
                                    "--out", str(tmp_path / "o2")])
    assert "frame 0 is 4x3 pixels" in line


def test_every_and_max_side_must_be_sane(tmp_path, weights, video, capsys):
    assert "--every" in _one_line_error(capsys, ["count", "--weights", str(weights), str(video), "--every", "0"])
    assert "--max-side" in _one_line_error(capsys, ["count", "--weights", str(weights), str(video),
                                                    "--max-side", "-1"])


def test_truncated_video_counts_what_decodes_and_warns(tmp_path, weights, capsys):
    rng = np.random.default_rng(1)
    full = tmp_path / "full.mp4"
    writer = imageio.get_writer(full, fps=12, codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
                                output_params=["-movflags", "+faststart"])  # index first: half a file still opens
    for _ in range(48):
        writer.append_data(rng.integers(0, 255, (VH, VW, 3), dtype=np.uint8))
    writer.close()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert main(["count", "--weights", str(weights), str(cut), "--out", str(tmp_path / "o")]) == 0
    rows = _rows(tmp_path / "o" / "counts.csv")
    assert 0 < len(rows) < 48
    assert f"{len(rows)} frames decoded, its header announces about 48" in capsys.readouterr().err
