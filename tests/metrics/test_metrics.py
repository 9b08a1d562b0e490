"""KID, precision/recall, IS, CLIP score, sFID, the extractors and ``vkd fid``'s protocol, against their reference
libraries (torch-fidelity 0.4.0, torchmetrics) on the same images and the same random, locally saved weights.

Every comparison runs the reference library's own code on its own inputs (for the end-to-end ones: its own image
loading, feature extraction and metric), so none can pass by sharing vkd's code path.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_helpers import run_cli_output as cli
from PIL import Image
from torch import nn

from vkd.errors import UserError
from vkd.metrics import scores
from vkd.metrics.fid import feature_pass, load_reference, no_tf32

REL = 1e-4


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def one_line_error(code: int, err: str, fragment: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert fragment in errors[0], errors[0]


def write_images(folder: Path, images: torch.Tensor, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{start + i:04d}.png")
    return folder


class FeatLogits(nn.Module):
    """float [N, 3, H, W] in [0, 1] → (features [N, 12], logits [N, 7]): a fixed random two-layer network."""

    def __init__(self, h: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * h, 12), nn.Tanh())
        self.head = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x) * 3.0
        return f, self.head(f) * 2.0


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> SimpleNamespace:
    """Two folders of 16×16 PNGs (60 real, 50 fake, the fake ones darker) and a TorchScript (features, logits)."""
    root = tmp_path_factory.mktemp("sets")
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=gen)
    fake = (torch.randint(0, 256, (50, 3, 16, 16), dtype=torch.uint8, generator=gen).float() * 0.7 + 10).to(torch.uint8)
    torch.manual_seed(1)
    ts = root / "featlogits.ts"
    torch.jit.script(FeatLogits()).save(str(ts))
    return SimpleNamespace(root=root, real=write_images(root / "real", real), fake=write_images(root / "fake", fake),
                           ts=ts, n_real=60, n_fake=50)


# ------------------------------------------------------------------------------------------------------------
# the metric functions vs torch-fidelity's on the same features
# ------------------------------------------------------------------------------------------------------------


def test_kid_pr_is_equal_torch_fidelity_functions():
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    fake = torch.randn(250, 16, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    ours = scores.kid(fake, real, subsets=20, subset_size=100, seed=7)
    theirs = kid_features_to_metric(fake, real, kid_subsets=20, kid_subset_size=100, rng_seed=7, verbose=False)
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=REL)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=REL)
    assert ours[0] > 1e-3  # shifted and scaled: clearly nonzero
    # torch-fidelity 0.4.0 (installed) takes (generated, real); see the direction test below for issue #58
    p, r = scores.precision_recall(fake=fake, real=real, k=3, batch=64)  # blocks smaller than the sets
    theirs = prc_features_to_metric(fake, real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                    verbose=False)
    assert (p, r) == (pytest.approx(theirs["precision"], abs=1e-6), pytest.approx(theirs["recall"], abs=1e-6))  # theirs: float32 means
    assert 0 < p < 1 and 0 < r < 1
    logits = torch.randn(97, 11, generator=gen) * 3
    ours = scores.inception_score(logits, splits=4, seed=5)
    theirs = isc_features_to_metric(logits, splits=4, shuffle=True, rng_seed=5)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=REL)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=REL)
    assert ours[0] > 1.5


def test_precision_recall_direction_guards_issue_58():
    """A mode-collapsed generator (every sample near one real point) has high precision and low recall. A swap of the
    arguments (torch-fidelity issue #58) would report the opposite."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=gen)
    fake = real[:1] + 0.01 * torch.randn(300, 8, generator=gen)
    p, r = scores.precision_recall(fake=fake, real=real)
    assert p > 0.95 and r < 0.05
    swapped_p, swapped_r = scores.precision_recall(fake=real, real=fake)
    assert swapped_p < 0.05 and swapped_r > 0.95


def test_clip_score_formula_clamps_each_image():
    cos = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    assert scores.clip_score(cos) == pytest.approx(100 * (0.5 + 0.0 + 0.1) / 3, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------
# end to end: `vkd fid` vs torch_fidelity.calculate_metrics on the same folders and the same network
# ------------------------------------------------------------------------------------------------------------


def _register_torchscript_extractor(name: str, ts_path: Path) -> None:
    """The same TorchScript network as a torch-fidelity feature extractor (uint8 in, as torch-fidelity feeds it)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    class TS(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = torch.jit.load(str(ts_path)).eval()

        def forward(self, x):
            feats, logits = self.net(x.float() / 255.0)
            out = {"feat": feats, "logits": logits}
            return tuple(out[a] for a in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return "feat", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, TS)


def _fidelity(real: Path, fake: Path, **kwargs) -> dict:
    import torch_fidelity

    return torch_fidelity.calculate_metrics(input1=str(fake), input2=str(real), cuda=False, cache=False,
                                            verbose=False, save_cpu_ram=True, batch_size=16, **kwargs)


def test_cli_all_metrics_equal_torch_fidelity(sets, capsys, tmp_path):
    _register_torchscript_extractor("vkd-test-featlogits", sets.ts)
    theirs = _fidelity(sets.real, sets.fake, fid=True, kid=True, prc=True, isc=True,
                       feature_extractor="vkd-test-featlogits", kid_subsets=30, kid_subset_size=40, isc_splits=5)
    out_json = tmp_path / "r.json"
    code, out, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--extractor", sets.ts,
                         "--metrics", "fid,kid,pr,is", "--kid-subsets", 30, "--kid-subset-size", 40,
                         "--is-splits", 5, "--batch-size", 7, "--device", "cpu", "--out", out_json)
    assert code == 0, err
    ours = json.loads(out_json.read_text())
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=REL) and ours["fid"] > 0.5
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=REL)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=REL)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=REL)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=REL)
    # one line on stdout with every score
    lines = out.strip().splitlines()
    assert len(lines) == 1 and all(k in lines[0] for k in ("FID ", "KID ", "precision ", "recall ", "IS "))
    proto = ours["protocol"]
    assert proto["n_real"] == sets.n_real and proto["n_fake"] == sets.n_fake and proto["vkd_version"]
    assert proto["extractor"] == "torchscript:featlogits.ts" and len(proto["extractor_sha256"]) == 64
    assert proto["metrics"]["kid"]["subset_size"] == 40 and proto["metrics"]["is"]["splits"] == 5
    assert proto["seeds"] == {"sampling": None} and proto["metrics"]["kid"]["seed"] == 2020


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> Path:
    """Random Inception weights in torch-fidelity's layout whose batch-norm statistics are those of one random batch,
    so that activations stay O(1) (plain random weights give pool3 values ≈ 1e11 and logits that overflow softmax)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # running statistics = the statistics of the calibration batch
    with torch.no_grad():
        model.train()(torch.randn(3, 3, 299, 299))
        model.fc.weight *= 0.01  # logits of a few units, as a trained network's (IS needs a softmax that is not one-hot)
    path = tmp_path_factory.mktemp("inception") / "calibrated-random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_inception_kid_pr_is_equal_torch_fidelity(random_inception, capsys, tmp_path):
    """Inception (random local weights): pool3 and logits_unbiased from one pass give torch-fidelity's FID, KID,
    precision/recall and IS (torch-fidelity extracting on its own)."""
    gen = torch.Generator().manual_seed(3)
    real = write_images(tmp_path / "real", torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen))
    fake = write_images(tmp_path / "fake", torch.randint(0, 128, (4, 3, 32, 32), dtype=torch.uint8, generator=gen))
    out_json, stats = tmp_path / "i.json", tmp_path / "ref.npz"
    code, _, err = cli(capsys, "fid", "--real", real, "--fake", fake, "--weights", random_inception,
                       "--metrics", "fid,kid,pr,is", "--kid-subsets", 10, "--kid-subset-size", 4,
                       "--is-splits", 2, "--device", "cpu", "--out", out_json, "--save-stats", stats)
    assert code == 0, err
    ours = json.loads(out_json.read_text())
    theirs = _fidelity(real, fake, fid=True, kid=True, prc=True, isc=True, kid_subsets=10, kid_subset_size=4,
                       isc_splits=2, feature_extractor="inception-v3-compat",
                       feature_extractor_weights_path=str(random_inception))
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=REL) and ours["fid"] > 0
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=REL) and ours["kid"] != 0
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=REL) and ours["is"] > 1
    with np.load(stats) as data:
        assert data["features"].shape == (4, 2048) and data["features"].dtype == np.float32
    assert ours["protocol"]["resize"] == "tf1-bilinear-299 (antialias=False)"


def test_inception_spatial_features_are_mixed_6_conv(random_inception):
    """sFID's features: the first 7 channels of TF's ``mixed_6/conv`` (the 1x1 branch of Mixed_6d, which is also the
    first 192 channels of Mixed_6d's output), 17×17, flattened in TF's HWC order: 2023 values."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from vkd.metrics.extractors import InceptionExtractor

    ext = InceptionExtractor(random_inception)
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    with torch.no_grad():
        out = ext.extract(images, frozenset({"features", "spatial"}))
        m = ext.model
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d"):
            x = getattr(m, name)(x)
    expected = x[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # [2, 17 * 17 * 7]
    assert out["spatial"].shape == (2, 2023)
    torch.testing.assert_close(out["spatial"], expected, rtol=1e-5, atol=1e-5)
    assert out["spatial"].abs().max() > 0


@pytest.mark.slow  # 2023-d Fréchet distances (sFID): 60 s on this project's 2-core CPU, measured under load
def test_sfid_from_folders_and_saved_statistics(random_inception, capsys, tmp_path):
    gen = torch.Generator().manual_seed(5)
    real = write_images(tmp_path / "real", torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen))
    fake = write_images(tmp_path / "fake", torch.randint(0, 128, (3, 3, 32, 32), dtype=torch.uint8, generator=gen))
    a, b, stats = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "ref.npz"
    base = ["--fake", fake, "--weights", random_inception, "--metrics", "fid,sfid", "--device", "cpu"]
    assert cli(capsys, "fid", "--real", real, *base, "--out", a, "--save-stats", stats)[0] == 0
    with np.load(stats) as data:
        assert data["mu_s"].shape == (2023,) and data["sigma_s"].shape == (2023, 2023)
    assert cli(capsys, "fid", "--real", stats, *base, "--out", b)[0] == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["sfid"] > 0 and rb["sfid"] == pytest.approx(ra["sfid"], rel=1e-9)


# ------------------------------------------------------------------------------------------------------------
# DINOv2 and CLIP extractors
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=56,
                       patch_size=14)
    path = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(cfg).eval().save_pretrained(path)
    return path


def test_dinov2_extractor_is_cls_after_torch_fidelity_preprocessing(tiny_dinov2, sets, capsys, tmp_path):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    from transformers import Dinov2Model

    from vkd.metrics.extractors import build_extractor
    from vkd.metrics.fid import FrechetStats, frechet_distance

    ext = build_extractor("dinov2", str(tiny_dinov2))
    images = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8)
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(224, 224), align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        expected = model(pixel_values=(x - mean) / std).last_hidden_state[:, 0]
        torch.testing.assert_close(ext(images), expected, rtol=1e-5, atol=1e-5)
    assert ext.num_features == 32 and "dinov2" in ext.name and ext.weights_path.endswith("model.safetensors")
    # through the CLI: FD_DINOv2 of the folders equals the Fréchet distance of these features
    out_json = tmp_path / "d.json"
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--extractor", "dinov2", "--weights",
                       tiny_dinov2, "--num-real", 20, "--num-fake", 20, "--device", "cpu", "--out", out_json)
    assert code == 0, err

    def feats(folder: Path) -> torch.Tensor:
        imgs = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)
                            for f in sorted(folder.glob("*.png"))[:20]])
        with torch.no_grad():
            return ext(imgs)

    r, f = FrechetStats().update(feats(sets.real)), FrechetStats().update(feats(sets.fake))
    assert json.loads(out_json.read_text())["fid"] == pytest.approx(frechet_distance(f.mu, f.sigma, r.mu, r.sigma),
                                                                     rel=REL)


def _clip_jit_archive(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A TorchScript archive holding ``state`` under its dotted names (the form of OpenAI's CLIP files)."""
    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                setattr(mod, p, Holder())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_openai_clip(tmp_path_factory) -> SimpleNamespace:
    """A random open_clip CLIP in OpenAI's layout (QuickGELU, 64-wide ViT: torch-fidelity's head count), as a state
    dict and as a TorchScript archive."""
    import open_clip

    torch.manual_seed(0)
    cfg = {"embed_dim": 24, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
    model = open_clip.CLIP(**cfg).eval()
    state = model.state_dict()
    root = tmp_path_factory.mktemp("clip")
    torch.save(state, root / "tiny-clip-state.pt")
    (root / "vkd-test-tiny-openai-clip.json").write_text(json.dumps(cfg))
    return SimpleNamespace(state=root / "tiny-clip-state.pt", jit=_clip_jit_archive(state, root / "tiny-clip.pt"),
                           config=root / "vkd-test-tiny-openai-clip.json", model=model)


def test_clip_extractor_fid_equals_torch_fidelity(tiny_openai_clip, sets, capsys, tmp_path):
    theirs = _fidelity(sets.real, sets.fake, fid=True, feature_extractor="clip-vit-b-32",
                       feature_extractor_weights_path=str(tiny_openai_clip.jit))
    for weights in (tiny_openai_clip.state, tiny_openai_clip.jit):  # a state dict, or OpenAI's TorchScript form
        out_json = tmp_path / "c.json"
        code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--extractor", "clip",
                           "--weights", weights, "--device", "cpu", "--out", out_json)
        assert code == 0, err
        ours = json.loads(out_json.read_text())
        assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=REL) and ours["fid"] > 0
        assert ours["protocol"]["resize"].startswith("tf1-bilinear-32")


def test_extractor_weights_offline_errors_name_the_file(sets, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    base = ["fid", "--real", sets.real, "--fake", sets.fake, "--device", "cpu"]
    code, _, err = cli(capsys, *base, "--extractor", "clip")
    one_line_error(code, err, "ViT-B-32.pt")
    code, _, err = cli(capsys, *base, "--extractor", "dinov2", "--weights", sets.ts)
    one_line_error(code, err, "facebook/dinov2-large")
    code, _, err = cli(capsys, *base, "--extractor", "dinov2")
    one_line_error(code, err, "facebook/dinov2-large")
    code, _, err = cli(capsys, *base, "--metrics", "clip", "--prompts", sets.ts)
    one_line_error(code, err, "ViT-L-14.pt")


def test_clip_weights_never_run_pickled_code(sets, capsys, tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').close()",)

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(), "w": torch.zeros(1)}, path)
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--extractor", "clip",
                       "--weights", path, "--device", "cpu")
    one_line_error(code, err, "refusing to load CLIP weights")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: trusted loading runs it
    assert marker.exists()


# ------------------------------------------------------------------------------------------------------------
# CLIP score vs torchmetrics
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random tiny open_clip model saved in open_clip's local-dir layout."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(2)
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    model = open_clip.CLIP(**model_cfg).eval()
    path = tmp_path_factory.mktemp("openclip") / "tiny"
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                           "interpolation": "bicubic", "resize_mode": "shortest"}}))
    return path


PROMPTS = ["a red square", "two cats", "a blue circle on grass", "noise", "a photo of the sea", "digits",
           "a dark room", "an orange"]


def _torchmetrics_clip(clip_dir: Path):
    """torchmetrics' CLIP-score code on an open_clip model it loads itself (its model/processor interface)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()

    class Model:
        config = SimpleNamespace()

        def to(self, device):
            return self

        def get_image_features(self, pixel_values):
            return model.encode_image(pixel_values)

        def get_text_features(self, input_ids, attention_mask=None):
            return model.encode_text(input_ids)

    def processor(images=None, text=None, **kwargs):
        if images is not None:
            pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
            return {"pixel_values": torch.stack([preprocess(p) for p in pil])}
        ids = tokenizer(text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return lambda: (Model(), processor)


def test_clip_score_model_from_config_and_openai_or_state_dict_weights(tiny_openai_clip):
    """``--clip-model CONFIG.json --clip-weights FILE``: OpenAI's TorchScript form and a plain state dict load the same
    network, the one the file was written from."""
    import open_clip

    from vkd.metrics.clip_score import ClipScorer

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    prompts = ["a cat", "two dogs", "the sea"]
    got = [ClipScorer(str(tiny_openai_clip.config), str(w)).cosines(images, prompts)
           for w in (tiny_openai_clip.jit, tiny_openai_clip.state)]
    _, _, preprocess = open_clip.create_model_and_transforms("vkd-test-tiny-openai-clip")
    model, tokenizer = tiny_openai_clip.model, open_clip.get_tokenizer("vkd-test-tiny-openai-clip")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(i.permute(1, 2, 0).numpy())) for i in images]))
        txt = model.encode_text(tokenizer(prompts))
    expected = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=1)
    for g in got:
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


def test_clip_score_equals_torchmetrics(tiny_clip_dir, capsys, tmp_path):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update, clip_score

    gen = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (8, 3, 40, 48), dtype=torch.uint8, generator=gen)  # resized and cropped to 32
    fake = write_images(tmp_path / "fake", images)
    (fake / "0002.png").unlink()  # a gap in the listing: prompts follow file names, not positions
    (fake / "broken.png").write_bytes(b"\x89PNG garbage")  # unreadable: skipped, counted
    real = write_images(tmp_path / "real", images[:3])
    mapping = {f"{i:04d}.png": p for i, p in enumerate(PROMPTS)}
    (tmp_path / "prompts.json").write_text(json.dumps(mapping))
    out_json = tmp_path / "clip.json"
    code, out, err = cli(capsys, "fid", "--real", real, "--fake", fake, "--metrics", "clip", "--clip-model",
                         f"local-dir:{tiny_clip_dir}", "--prompts", tmp_path / "prompts.json", "--device", "cpu",
                         "--out", out_json)
    assert code == 0, err
    ours = json.loads(out_json.read_text())
    keep = [i for i in range(8) if i != 2]
    with torch.no_grad():
        raw, n = _clip_score_update([images[i] for i in keep], [PROMPTS[i] for i in keep], *_torchmetrics_clip(
            tiny_clip_dir)())
        public = clip_score([images[i] for i in keep], [PROMPTS[i] for i in keep], _torchmetrics_clip(tiny_clip_dir))
    assert n == 7 and ours["num_samples"] == 7 and ours["skipped_fake"] == 1
    assert (raw > 0).any() and (raw < 0).any()  # the per-image clamp matters on these weights
    assert ours["clip_score"] == pytest.approx(float(raw.clamp(min=0).mean()), rel=REL)
    # torchmetrics clamps the mean instead: lower here, equal when no cosine is negative
    assert float(public) == pytest.approx(max(float(raw.mean()), 0.0), abs=1e-5) and float(public) < ours["clip_score"]
    assert "CLIP " in out and ours["protocol"]["metrics"]["clip"]["weights_sha256"]
    # the same images as a run whose generator yields (images, prompts): the same score
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: toy-t2i\n")

    def generator(run_dir, indices, seed, batch_size, device):
        idx = list(indices)

        def batches():
            for s in range(0, len(idx), batch_size):
                yield images[[keep[i] for i in idx[s:s + batch_size]]], [PROMPTS[keep[i]] for i in idx[s:s + batch_size]]

        return batches(), (40, 48)

    from vkd.metrics.fid_command import fid_command

    again = fid_command(str(real), str(run), "inception", None, 3, 7, None, "cpu", metrics="clip",
                        clip_model=f"local-dir:{tiny_clip_dir}", run_generators={"toy-t2i": generator})
    assert again["clip_score"] == pytest.approx(ours["clip_score"], rel=1e-5)  # other batches: float32 rounding
    # prompts from a file, one line per image file of the folder listing (the unreadable one included)
    listing = sorted(p.name for p in fake.iterdir())
    (tmp_path / "prompts.txt").write_text("\n".join(mapping.get(n, "junk") for n in listing) + "\n")
    code, _, err = cli(capsys, "fid", "--real", real, "--fake", fake, "--metrics", "clip", "--clip-model",
                       f"local-dir:{tiny_clip_dir}", "--prompts", tmp_path / "prompts.txt", "--device", "cpu",
                       "--out", out_json)
    assert code == 0, err
    assert json.loads(out_json.read_text())["clip_score"] == pytest.approx(ours["clip_score"], rel=1e-9)
    (tmp_path / "short.txt").write_text("one\ntwo\n")
    code, _, err = cli(capsys, "fid", "--real", real, "--fake", fake, "--metrics", "clip", "--clip-model",
                       f"local-dir:{tiny_clip_dir}", "--prompts", tmp_path / "short.txt", "--device", "cpu")
    one_line_error(code, err, "2 prompts for the 8 image files")
    code, _, err = cli(capsys, "fid", "--real", real, "--fake", fake, "--metrics", "clip", "--clip-model",
                       f"local-dir:{tiny_clip_dir}", "--device", "cpu")
    one_line_error(code, err, "--prompts FILE")


# ------------------------------------------------------------------------------------------------------------
# statistics files, counts, protocol, --compare
# ------------------------------------------------------------------------------------------------------------


def test_save_stats_reuse_num_real_and_compare(sets, capsys, tmp_path):
    base = ["--extractor", sets.ts, "--device", "cpu", "--kid-subsets", 10, "--kid-subset-size", 20]
    a, b, stats = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "ref.npz"
    # --num-fake truncates only the fake set: the real set stays whole
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--metrics", "fid,kid,pr",
                       "--num-fake", 30, "--save-stats", stats, "--out", a, *base)
    assert code == 0, err
    ra = json.loads(a.read_text())
    assert ra["num_samples"] == 30 and ra["num_reference"] == sets.n_real
    with np.load(stats) as data:
        assert data["features"].shape == (sets.n_real, 12) and data["mu"].dtype == np.float64
        assert int(data["num"]) == sets.n_real and str(data["format"]) == "vkd-fid-stats-2"
        assert json.loads(str(data["image_size"])) == [16, 16] and len(str(data["extractor_sha256"])) == 64
        assert str(data["reference_id"]) == ra["protocol"]["reference"]
    # the saved statistics give the same scores and the same protocol as the folder
    code, _, err = cli(capsys, "fid", "--real", stats, "--fake", sets.fake, "--metrics", "fid,kid,pr",
                       "--num-fake", 30, "--out", b, *base)
    assert code == 0, err
    rb = json.loads(b.read_text())
    assert rb["fid"] == pytest.approx(ra["fid"], rel=1e-10) and rb["kid"] == pytest.approx(ra["kid"], rel=1e-10)
    assert (rb["precision"], rb["recall"]) == (ra["precision"], ra["recall"])
    assert rb["protocol"] == ra["protocol"]
    code, out, err = cli(capsys, "fid", "--compare", a, b)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 and "FID" in out and "same protocol" in out
    # another n_fake, another reference subset: refused, one line naming the difference
    c = tmp_path / "c.json"
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--metrics", "fid", "--num-real", 40,
                       "--out", c, *base)
    assert code == 0, err
    assert json.loads(c.read_text())["num_reference"] == 40
    code, _, err = cli(capsys, "fid", "--compare", a, c)
    one_line_error(code, err, "protocols differ in n_fake (30 vs 50); n_real (60 vs 40); reference")
    (tmp_path / "old.json").write_text(json.dumps({"fid": 1.0}))
    code, _, err = cli(capsys, "fid", "--compare", a, tmp_path / "old.json")
    one_line_error(code, err, "has no protocol")
    # the deprecated --num still works, as --num-fake, with a warning
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--num", 30, "--out", c, *base)
    assert code == 0 and "--num is deprecated" in err
    assert json.loads(c.read_text())["num_reference"] == sets.n_real
    # statistics without features: FID only
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--save-stats", stats, *base)
    assert code == 0, err
    with np.load(stats) as data:
        assert "features" not in data.files
    code, _, err = cli(capsys, "fid", "--real", stats, "--fake", sets.fake, "--metrics", "kid", *base)
    one_line_error(code, err, "KID needs the real features")


def test_cli_bad_inputs_are_one_line_errors(sets, capsys, tmp_path):
    base = ["--real", sets.real, "--fake", sets.fake, "--extractor", sets.ts, "--device", "cpu"]
    cases = [
        (["--metrics", "kid"], "KID (subsets of 1000) on the real set needs at least 1000 images, got 60"),
        (["--metrics", "pr", "--pr-k", 60], "precision/recall (k = 60) on the real set needs at least 61 images"),
        (["--metrics", "is", "--is-splits", 51], "Inception Score (51 splits) on the fake set needs at least 51"),
        (["--metrics", "fid,bogus"], "unknown metric(s) bogus"),
        (["--metrics", "sfid"], "sFID needs"),
        (["--num", 5, "--num-fake", 5], "give only --num-fake"),
    ]
    for extra, fragment in cases:
        code, _, err = cli(capsys, "fid", *base, *extra)
        one_line_error(code, err, fragment)
    code, _, err = cli(capsys, "fid", "--fake", sets.fake)
    one_line_error(code, err, "needs --real and --fake")
    # IS asked of an extractor without logits (known up front, or seen on the first batch)
    ts = tmp_path / "feat.ts"

    class Feat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    torch.jit.script(Feat()).save(str(ts))
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", sets.fake, "--extractor", ts, "--metrics", "is",
                       "--device", "cpu")
    one_line_error(code, err, "gives no class logits")
    # statistics only where images are needed; a .npz without the arrays a metric needs
    stats = tmp_path / "s.npz"
    assert cli(capsys, "fid", *base, "--save-stats", stats)[0] == 0
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", stats, "--extractor", sets.ts, "--metrics", "is")
    one_line_error(code, err, "IS needs the fake images")
    code, _, err = cli(capsys, "fid", "--real", stats, "--fake", sets.fake, "--extractor", sets.ts, "--metrics", "pr")
    one_line_error(code, err, "precision/recall needs the real features")
    code, _, err = cli(capsys, "fid", "--real", stats, "--fake", sets.fake, "--extractor", sets.ts, "--save-stats",
                       tmp_path / "x.npz")
    one_line_error(code, err, "already is statistics")
    # mixed sizes; an unreadable file is skipped and counted
    mixed = write_images(tmp_path / "mixed", torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(mixed / "odd.png")
    code, _, err = cli(capsys, "fid", "--real", sets.real, "--fake", mixed, "--extractor", sets.ts)
    one_line_error(code, err, "different sizes")
    (mixed / "odd.png").write_bytes(b"\x89PNG garbage")
    code, out, err = cli(capsys, "fid", "--real", sets.real, "--fake", mixed, "--extractor", sets.ts, "--device", "cpu")
    assert code == 0 and "skipped=1 unreadable" in out and "skipped 1 unreadable fake image(s): odd.png" in err


def test_load_reference_reads_only_what_is_needed(tmp_path):
    """An ADM-style reference batch (images as ``arr_0``, ``mu``, ``sigma``, ``mu_s``, ``sigma_s``): the images and
    unrequested arrays are never read. Here they are truncated, so reading them would fail."""
    import io
    import zipfile

    def npy(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    huge_images = npy(np.zeros((1000, 8, 8, 3), np.uint8))[:200]  # header + a few bytes of ≈192 kB
    bad_features = npy(np.zeros((50, 4), np.float32))[:150]
    path = tmp_path / "VIRTUAL_ref_batch.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", huge_images)
        z.writestr("mu.npy", npy(x.mean(0)))
        z.writestr("sigma.npy", npy(np.cov(x, rowvar=False)))
        z.writestr("mu_s.npy", npy(x[:, :2].mean(0)))
        z.writestr("sigma_s.npy", npy(np.cov(x[:, :2], rowvar=False)))
        z.writestr("features.npy", bad_features)
    ref = load_reference(path)
    np.testing.assert_allclose(ref.mu, x.mean(0))
    assert ref.num is None and ref.arrays == {} and set(ref.available) >= {"arr_0", "mu_s", "features"}
    ref = load_reference(path, ["mu_s", "sigma_s"])
    assert ref.arrays["mu_s"].shape == (2,) and ref.arrays["sigma_s"].shape == (2, 2)
    with pytest.raises(UserError, match="cannot read reference statistics"):
        load_reference(path, ["features"])


# ------------------------------------------------------------------------------------------------------------
# TF32 and two processes
# ------------------------------------------------------------------------------------------------------------


def test_tf32_off_while_extracting_and_restored_on_every_exit():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    seen = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((matmul.fp32_precision, conv.fp32_precision))
            if len(seen) == 2:
                raise RuntimeError("boom")
            return x.float().mean(dim=(2, 3))

    try:
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
        batches = [torch.zeros(2, 3, 4, 4, dtype=torch.uint8)] * 3
        with pytest.raises(RuntimeError, match="boom"):
            feature_pass(batches, Spy())
        assert seen == [("ieee", "ieee")] * 2
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with no_tf32():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


GENERATOR = textwrap.dedent("""
    import torch

    def generator(run_dir, indices, seed, batch_size, device):
        idx = list(indices)

        def batches():
            for s in range(0, len(idx), batch_size):
                yield torch.stack([torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8,
                                                 generator=torch.Generator().manual_seed(1000 * seed + i))
                                   for i in idx[s:s + batch_size]])

        return batches(), (16, 16)
""")

DIST_SCRIPT = GENERATOR + textwrap.dedent("""
    import json, sys
    from vkd.metrics.fid_command import fid_command

    def both(real, fake, run, ts):
        kw = dict(metrics="fid,kid,pr,is", kid_subsets=5, kid_subset_size=10, is_splits=3)
        a = fid_command(real, fake, ts, None, 4, None, None, "cpu", **kw)
        b = fid_command(real, run, ts, None, 4, 21, None, "cpu", 3, run_generators={"toy-gen": generator}, **kw)
        return {"folder": a, "run": b}

    if __name__ == "__main__":
        import os
        from vkd.engine.runs import close_process_group

        result = both(*sys.argv[1:5])
        if int(os.environ.get("RANK", "0")) == 0:  # one writer: two ranks writing one file can interleave
            with open(sys.argv[5], "w") as f:
                json.dump(result, f)
        close_process_group()
""")


def test_two_processes_equal_one_for_every_metric(sets, tmp_path, master_port):
    """Sample order is kept across processes (KID subsets and the IS shuffle depend on it): 2 processes = 1."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: toy-gen\n")
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    args = [str(sets.real), str(sets.fake), str(run), str(sets.ts)]
    scope: dict = {}
    exec(compile(DIST_SCRIPT, str(script), "exec"), scope)  # noqa: S102 - the script above, in this process
    r1 = json.loads(json.dumps(scope["both"](*args)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", master_port,
           str(script), *args, str(tmp_path / "two.json")]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    r2 = json.loads((tmp_path / "two.json").read_text())
    for key in ("folder", "run"):
        a, b = r1[key], r2[key]
        assert b["num_processes"] == 2 and a["num_processes"] == 1
        assert a["num_samples"] == b["num_samples"] == (sets.n_fake if key == "folder" else 21)
        for metric in ("fid", "kid", "is"):
            assert b[metric] == pytest.approx(a[metric], rel=1e-5), (key, metric)
        assert (b["precision"], b["recall"]) == (a["precision"], a["recall"]), key
        assert b["protocol"] == a["protocol"]
