"""Feature extractors for FID: TF-port Inception (torch-fidelity), TorchScript / vkd classifiers, digits CNN.

Every extractor is an ``nn.Module`` taking **uint8 images** ``[N, 3, H, W]`` (what a PNG holds; grey
images are replicated to 3 channels by the loader) and returning float features ``[N, d]``. It carries
``name`` (written in every output), ``num_features`` and ``resize`` (how it brings images to its input
size) attributes.

- ``inception``: torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d pool3, TF1-exact bilinear
  resize to 299, i.e. ``antialias=False``), the extractor behind torch-fidelity and torchmetrics. It
  is loaded from an explicit weights file, or from the torch hub cache / the usual download.
- a path: a TorchScript module (called on float [0, 1] images) or a vkd classifier checkpoint
  (``{"format": "vkd-classifier", "arch": ..., "state_dict": ...}``).
- ``digits``: a small CNN trained deterministically on scikit-learn's digits (train split) whose
  128-d penultimate activations are the features. It is **not Inception**: its numbers are only
  comparable with other ``digits-cnn`` numbers.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from vkd.cache import atomic_torch_save, build_once, cache_dir, training_mode
from vkd.data.digits import load_digits
from vkd.errors import DataError, UserError

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "DIGITS_EXTRACTOR_NAME",
    "InceptionExtractor",
    "TorchScriptExtractor",
    "DigitsCNN",
    "ClassifierExtractor",
    "build_extractor",
    "digits_extractor",
    "file_sha256",
    "cache_dir",
]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
DIGITS_EXTRACTOR_NAME = "digits-cnn (not Inception)"
DIGITS_CACHE_FILE = "digits-cnn-v1.pt"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_images(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1|3, H, W], got {x.dtype} {tuple(x.shape)}")


class InceptionExtractor(nn.Module):
    """TF-port InceptionV3 pool3 features (2048-d) through torch-fidelity, TF1-exact resize to 299.

    Args:
        weights_path: a local ``weights-inception-2015-12-05-6726825d.pth`` (offline use). ``None``
            looks in the torch hub cache and otherwise tries the usual download.
    """

    num_features = 2048
    resize = "tf1-bilinear-299 (antialias=False)"

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        # on use: torch-fidelity is only needed for the Inception extractor
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights_path is not None:
            path = Path(weights_path).expanduser()
            if not path.is_file():  # never fall back to the network when a file was named
                raise UserError(f"Inception weights file not found: {path} (expected {INCEPTION_FILE} from "
                                f"{INCEPTION_URL})")
        else:
            path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
            if not path.is_file():
                old = socket.getdefaulttimeout()
                socket.setdefaulttimeout(20)  # an offline machine must fail fast, not hang
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
                except Exception as err:  # offline: URLError, socket errors, HTTP errors
                    raise UserError(f"Inception weights {INCEPTION_FILE} are not in {path.parent} and the download "
                                    f"from {INCEPTION_URL} failed ({type(err).__name__}); download it elsewhere "
                                    "and pass --inception-weights PATH") from None
                finally:
                    socket.setdefaulttimeout(old)
        # torch-fidelity reads the file with torch.load(weights_only=False), which would run any code pickled
        # into it: read it here with weights_only=True and hand torch-fidelity the checked state dict instead
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for anything beyond tensors and containers, corrupt files
            text = str(err).strip()
            raise UserError(f"refusing to load Inception weights from {path}: "
                            f"{text.splitlines()[0] if text else type(err).__name__}") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise UserError(f"{path} does not hold an Inception state dict")
        try:
            with mock.patch.object(torch, "load", lambda *args, **kwargs: state):
                self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                         feature_extractor_weights_path=str(path))
        except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
            raise UserError(f"cannot load Inception weights from {path}: {str(err).splitlines()[0]}") from None
        self.weights_path = str(path)
        self.name = "inception-v3-compat (torch-fidelity, pool3 2048)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.model(images)[0]


class TorchScriptExtractor(nn.Module):
    """A TorchScript feature network ``f(float [N, 3, H, W] in [0, 1]) -> [N, d]`` (or a tuple; first item)."""

    resize = "none (the module's own)"

    def __init__(self, path: str | Path):
        super().__init__()
        self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.name = f"torchscript:{Path(path).name}"
        self.weights_path = str(path)
        self.num_features = int(getattr(self.model, "num_features", 0)) or None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        out = self.model(images.float() / 255.0)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)


class DigitsCNN(nn.Module):
    """Small CNN for 16×16 grey digits; ``features()`` is the 128-d penultimate activation."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
            nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.input_size = 16

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float ``[N, 1, 16, 16]`` in [-1, 1] → ``[N, feature_dim]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


CLASSIFIER_ARCHS: dict[str, type[nn.Module]] = {"digits-cnn": DigitsCNN}


def _to_grey16(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` → float grey ``[N, 1, size, size]`` in [-1, 1] (antialiased bilinear resize)."""
    x = images.float().div(255.0).mean(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


class ClassifierExtractor(nn.Module):
    """Penultimate features of a vkd classifier checkpoint (``format: vkd-classifier``)."""

    resize = "bilinear-antialias to the classifier input size"

    def __init__(self, model: nn.Module, name: str, weights_path: str | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.weights_path = weights_path
        self.num_features = int(model.head.in_features) if hasattr(model, "head") else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.model.features(_to_grey16(images, self.model.input_size))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` → the classifier's predicted class ``[N]`` (e.g. the digit drawn)."""
        _check_images(images)
        return self.model(_to_grey16(images, self.model.input_size)).argmax(1)


def _load_classifier_checkpoint(path: Path) -> ClassifierExtractor:
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path} is neither a TorchScript module nor a vkd classifier checkpoint "
                        f"({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "vkd-classifier":
        raise DataError(f"{path} is neither a TorchScript module nor a vkd classifier checkpoint "
                        "(no 'format: vkd-classifier')")
    arch = ckpt.get("arch")
    if arch not in CLASSIFIER_ARCHS:
        raise DataError(f"{path}: unknown classifier arch '{arch}'; known: {', '.join(CLASSIFIER_ARCHS)}")
    model = CLASSIFIER_ARCHS[arch](**ckpt.get("arch_kwargs", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise DataError(f"{path}: state dict does not match arch '{arch}': {str(err).splitlines()[0]}") from None
    name = ckpt.get("name") or f"{arch}:{path.name}"
    return ClassifierExtractor(model, name, str(path))


@training_mode()  # trains: gradients on whatever the caller's mode
def train_digits_cnn(seed: int = 0, epochs: int = 30, batch_size: int = 64) -> tuple[DigitsCNN, float]:
    """Train :class:`DigitsCNN` on the digits train split (16×16, uint8-quantised like PNGs). Deterministic on a
    given machine (fixed seed, single thread order). Returns ``(model, test accuracy)``."""
    def quantised(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = load_digits(split, size=16, channels=1, value_range="unit")
        u8 = (d.images * 255.0).round().clamp(0, 255).to(torch.uint8)
        return _to_grey16(u8, 16), d.labels

    x, y = quantised("train")
    xt, yt = quantised("test")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            # ±1 pixel random shifts: features that tolerate small misalignments of generated digits
            sx, sy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(x[idx], shifts=(sy, sx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return model, acc


def digits_extractor(cache: str | Path | None = None) -> ClassifierExtractor:
    """The embedded default extractor: trained once (≈10 s on CPU) and cached as a vkd classifier checkpoint.

    Args:
        cache: checkpoint path (default ``cache_dir()/digits-cnn-v1.pt``).
    """
    path = Path(cache) if cache is not None else cache_dir() / DIGITS_CACHE_FILE

    def build() -> None:
        model, acc = train_digits_cnn()
        atomic_torch_save({"format": "vkd-classifier", "arch": "digits-cnn", "arch_kwargs": {},
                           "name": DIGITS_EXTRACTOR_NAME, "state_dict": model.state_dict(), "test_accuracy": acc},
                          path)

    # trains with gradients even when the first use is a no_grad evaluation; one process builds, others wait
    build_once(path, path.is_file, build)
    ext = _load_classifier_checkpoint(path)
    ext.name = DIGITS_EXTRACTOR_NAME
    return ext


def build_extractor(spec: str, inception_weights: str | None = None) -> nn.Module:
    """``inception`` | ``digits`` | a path to a TorchScript file or a vkd classifier checkpoint."""
    if spec == "inception":
        return InceptionExtractor(inception_weights)
    if spec == "digits":
        return digits_extractor()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"unknown extractor '{spec}': use 'inception', 'digits' or the path of a TorchScript / "
                        "vkd classifier checkpoint")
    try:
        return TorchScriptExtractor(path)
    except (RuntimeError, ValueError):
        return _load_classifier_checkpoint(path)


def extractor_info(extractor: nn.Module) -> dict[str, Any]:
    """Name, resize and weights SHA-256 of an extractor (for output JSON)."""
    info: dict[str, Any] = {"extractor": getattr(extractor, "name", type(extractor).__name__),
                            "resize": getattr(extractor, "resize", "unknown")}
    wp = getattr(extractor, "weights_path", None)
    if wp and Path(wp).is_file():
        info["extractor_sha256"] = file_sha256(wp)
    return info
