"""FID: float64 streaming statistics, Fréchet distance vs scipy, library parity (torchmetrics), extractors,
command-line behaviour on bad input, and two processes vs one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from vkd.errors import DataError, UserError
from vkd.metrics.fid import FrechetStats, frechet_distance, load_reference, quantize, stats_from_images
from vkd.metrics.fid_command import fid_command


def scipy_fid(x1: np.ndarray, x2: np.ndarray) -> float:
    """Reference: np.cov + scipy.linalg.sqrtm (no ``disp``, deprecated in SciPy 1.17)."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(600, 64))
    x2 = rng.normal(loc=0.3, scale=1.2, size=(500, 64)) @ rng.normal(size=(64, 64)) * 0.2
    a, b = FrechetStats().update(torch.from_numpy(x1)), FrechetStats().update(torch.from_numpy(x2))
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(scipy_fid(x1, x2), rel=1e-6)
    np.testing.assert_allclose(a.sigma, np.cov(x1, rowvar=False), rtol=1e-10, atol=1e-12)
    # identical sets: ≈ 0
    assert abs(frechet_distance(a.mu, a.sigma, a.mu, a.sigma)) < 1e-8


def test_streaming_and_merge_equal_one_shot():
    x = torch.randn(300, 16, dtype=torch.float32) * 3 + 1
    one = FrechetStats().update(x)
    streamed = FrechetStats()
    for chunk in x.split(37):
        streamed.update(chunk)
    merged = FrechetStats().update(x[:100]).merge(FrechetStats().update(x[100:]))
    for other in (streamed, merged):
        assert other.n == one.n
        np.testing.assert_allclose(other.mu, one.mu, rtol=1e-12)
        np.testing.assert_allclose(other.sigma, one.sigma, rtol=1e-10, atol=1e-12)
    with pytest.raises(DataError, match="at least 2"):
        FrechetStats().update(x[:1]).sigma  # noqa: B018


def test_npz_roundtrip(tmp_path):
    stats = FrechetStats().update(torch.randn(50, 8))
    stats.save_npz(tmp_path / "ref.npz", extractor="toy", resize="none", image_size=[8, 8])
    ref = load_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref.mu, stats.mu)
    np.testing.assert_array_equal(ref.sigma, stats.sigma)
    assert ref.num == 50 and ref.meta == {"extractor": "toy", "resize": "none", "image_size": [8, 8]}
    with np.load(tmp_path / "ref.npz") as data:  # readers that only know mu/sigma (EDM, pytorch-fid)
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (8, 8)


class LinearExtractor(nn.Module):
    """uint8 [N, 3, H, W] → [N, d]: a fixed random projection (declares num_features for torchmetrics)."""

    def __init__(self, h: int = 8, d: int = 12):
        super().__init__()
        self.num_features = d
        self.proj = nn.Linear(3 * h * h, d)
        self.name, self.resize = "linear-test", "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.float().flatten(1) / 255.0)


def test_matches_torchmetrics_with_custom_extractor():
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    ext = LinearExtractor()
    real = torch.randint(0, 256, (120, 3, 8, 8), dtype=torch.uint8)
    fake = (real.float() * 0.8 + 20).to(torch.uint8)
    ours_real, ours_fake = stats_from_images(real, ext, 32), stats_from_images(fake, ext, 32)
    ours = frechet_distance(ours_fake.mu, ours_fake.sigma, ours_real.mu, ours_real.sigma)
    metric = FrechetInceptionDistance(feature=ext, normalize=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-5)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised Inception state dict in torch-fidelity's layout (spec fid.md §3.3)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    model = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    torch.save(model.state_dict(), path)
    return path


def test_inception_parity_with_torchmetrics(random_inception_weights):
    """Same images, same (random, local) Inception weights: vkd's FID equals torchmetrics' to 1e-4 relative."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from vkd.metrics.extractors import InceptionExtractor

    gen = torch.Generator().manual_seed(1)
    # 5 + 5 images keep the CPU cost of 4 × 10 Inception forwards at 299² reasonable
    real = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=gen)
    fake = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=gen) // 2
    ext = InceptionExtractor(random_inception_weights)
    assert ext.name.startswith("inception-v3-compat") and "antialias=False" in ext.resize
    r, f = stats_from_images(real, ext, 5), stats_from_images(fake, ext, 5)
    ours = frechet_distance(f.mu, f.sigma, r.mu, r.sigma)
    # torchmetrics with the TF1-exact resize (antialias=False), i.e. torch-fidelity's preprocessing
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(random_inception_weights),
                                      antialias=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_missing_inception_weights_names_the_file_without_network(tmp_path, monkeypatch):
    from vkd.metrics import extractors

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError, match="weights-inception-2015-12-05-6726825d.pth"):
        extractors.InceptionExtractor(tmp_path / "nope.pth")


def test_inception_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    from vkd.metrics import extractors

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="--weights PATH"):
        extractors.InceptionExtractor(None)


def test_digits_cnn_training_is_deterministic_and_loadable(tmp_path):
    from vkd.metrics.extractors import DigitsCNN, build_extractor, train_digits_cnn

    m1, acc1 = train_digits_cnn(epochs=1)
    m2, acc2 = train_digits_cnn(epochs=1)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert acc1 == acc2 and acc1 > 0.5  # one epoch; the cached default trains 30
    path = tmp_path / "clf.pt"
    torch.save({"format": "vkd-classifier", "arch": "digits-cnn", "arch_kwargs": {}, "name": "my digits",
                "state_dict": m1.state_dict()}, path)
    ext = build_extractor(str(path))
    assert ext.name == "my digits" and isinstance(ext.model, DigitsCNN)
    feats = ext(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))  # any size: resized to 16×16
    assert feats.shape == (4, 128)


def test_torchscript_extractor(tmp_path):
    from vkd.metrics.extractors import build_extractor

    class Tiny(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))  # [N, 3]

    path = tmp_path / "tiny.ts"
    torch.jit.script(Tiny()).save(str(path))
    ext = build_extractor(str(path))
    assert ext.name == "torchscript:tiny.ts"
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(ext(x), torch.ones(2, 3))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DataError, match="neither a TorchScript"):
        build_extractor(str(tmp_path / "junk.pt"))


def _write_images(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture()
def toy_extractor(tmp_path) -> str:
    torch.manual_seed(0)
    lin = nn.Linear(3, 6)

    class Feat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.lin(x.mean(dim=(2, 3))), x.flatten(1)[:, :10]], 1)

    path = tmp_path / "feat.ts"
    torch.jit.script(Feat()).save(str(path))
    return str(path)


def test_fid_command_folders_npz_and_bad_input(tmp_path, toy_extractor):
    gen = torch.Generator().manual_seed(0)
    real = _write_images(tmp_path / "real", torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8, generator=gen))
    fake = _write_images(tmp_path / "fake", torch.randint(0, 200, (25, 3, 8, 8), dtype=torch.uint8, generator=gen))
    out = fid_command(str(real), str(fake), toy_extractor, None, 8, None, str(tmp_path / "fid.json"), "cpu",
                      save_stats=str(tmp_path / "real.npz"))
    data = json.loads((tmp_path / "fid.json").read_text())
    assert data["fid"] == pytest.approx(out["fid"]) and out["fid"] > 0
    assert out["num_samples"] == 25 and out["num_reference"] == 30 and out["extractor"] == "torchscript:feat.ts"
    assert out["smoke_test"] and out["line"].startswith("FID ")
    # the same score against the saved statistics
    again = fid_command(str(tmp_path / "real.npz"), str(fake), toy_extractor, None, 8, None, None, "cpu")
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-10)
    # unreadable files are skipped and counted, never silently
    (fake / "broken.png").write_bytes(b"\x89PNG garbage")
    skipped = fid_command(str(real), str(fake), toy_extractor, None, 8, None, None, "cpu")
    assert skipped["skipped_fake"] == 1 and "broken.png" in skipped["skipped_fake_files"][0]
    assert skipped["fid"] == pytest.approx(out["fid"], rel=1e-10) and "skipped=1" in skipped["line"]
    # bad input → one-line user errors
    with pytest.raises(DataError, match="not found"):
        fid_command(str(tmp_path / "nope"), str(fake), toy_extractor, None, 8, None, None, "cpu")
    small = _write_images(tmp_path / "small", torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(DataError, match="at least 2"):
        fid_command(str(real), str(small), toy_extractor, None, 8, None, None, "cpu")
    big = _write_images(tmp_path / "big", torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(DataError, match="size mismatch"):
        fid_command(str(real), str(big), toy_extractor, None, 8, None, None, "cpu")
    with pytest.raises(DataError, match="size mismatch"):
        fid_command(str(tmp_path / "real.npz"), str(big), toy_extractor, None, 8, None, None, "cpu")
    mixed = _write_images(tmp_path / "mixed", torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(mixed / "odd.png")
    with pytest.raises(DataError, match="different sizes"):
        fid_command(str(real), str(mixed), toy_extractor, None, 8, None, None, "cpu")
    with pytest.raises(UserError, match="unknown extractor"):
        fid_command(str(real), str(fake), "nonsense", None, 8, None, None, "cpu")


def test_quantize_matches_png_roundtrip(tmp_path):
    x = torch.rand(2, 3, 5, 5) * 2 - 1
    u8 = quantize(x)
    Image.fromarray(u8[0].permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    back = torch.from_numpy(np.array(Image.open(tmp_path / "a.png"))).permute(2, 0, 1)
    torch.testing.assert_close(back, u8[0])


DIST_SCRIPT = textwrap.dedent("""
    import json, sys
    from vkd.metrics.fid_command import fid_command
    out = fid_command(sys.argv[1], sys.argv[2], sys.argv[3], None, 4, None, sys.argv[4], "cpu")
""")


def test_two_processes_equal_one(tmp_path, toy_extractor, master_port):
    """``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2`` gives the same FID and counts as one process."""
    gen = torch.Generator().manual_seed(0)
    real = _write_images(tmp_path / "real", torch.randint(0, 256, (13, 3, 8, 8), dtype=torch.uint8, generator=gen))
    fake = _write_images(tmp_path / "fake", torch.randint(0, 256, (11, 3, 8, 8), dtype=torch.uint8, generator=gen))
    one = fid_command(str(real), str(fake), toy_extractor, None, 4, None, None, "cpu")
    script = tmp_path / "dist_fid.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", master_port,
           str(script), str(real), str(fake), toy_extractor, str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_processes"] == 2
    assert two["num_samples"] == one["num_samples"] == 11 and two["num_reference"] == one["num_reference"] == 13
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)  # float32 features, other batch composition
