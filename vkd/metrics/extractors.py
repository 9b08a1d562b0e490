"""Feature extractors for FID and the other generative metrics: TF-port Inception, DINOv2 and CLIP (all three with
torch-fidelity's preprocessing), TorchScript / vkd classifiers, and the embedded digits CNN.

Every extractor is an ``nn.Module`` taking **uint8 images** ``[N, 3, H, W]`` (what a PNG holds; grey
images are replicated to 3 channels by the loader) and returning float features ``[N, d]``. It carries
``name`` (written in every output), ``num_features``, ``resize`` (how it brings images to its input
size) and ``provides`` (the outputs :func:`extract_outputs` can return: ``features``, and ``logits`` for the
Inception Score, ``spatial`` for sFID; ``None`` when only the first batch can tell) attributes.

- ``inception`` (default): torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d pool3, TF1-exact bilinear
  resize to 299, i.e. ``antialias=False``), the extractor behind torch-fidelity and torchmetrics. One pass gives
  pool3 and the 1008-way ``logits_unbiased`` (IS) and, on request, the ``mixed_6/conv`` map of sFID. Loaded from
  an explicit weights file, or from the torch hub cache / the usual download.
- ``dinov2``: a local Hugging Face snapshot of ``facebook/dinov2-*`` (transformers ``Dinov2Model``; the feature is
  the CLS token after the final layer norm) behind torch-fidelity's DINOv2 preprocessing.
- ``clip``: an OpenAI CLIP checkpoint (TorchScript archive or state dict) through torch-fidelity's
  ``FeatureExtractorCLIP`` (the image embedding; FD_CLIP).
- a path: a TorchScript module (called on float [0, 1] images, returning features or ``(features, logits)``) or a
  vkd classifier checkpoint (``{"format": "vkd-classifier", "arch": ..., "state_dict": ...}``).
- ``digits``: a small CNN trained deterministically on scikit-learn's digits (train split) whose
  128-d penultimate activations are the features (its 10-way head gives logits). It is **not Inception**: its
  numbers are only comparable with other ``digits-cnn`` numbers.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Collection
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
    "DINOV2_DEFAULT_REPO",
    "CLIP_DEFAULT_MODEL",
    "DIGITS_EXTRACTOR_NAME",
    "EXTRACTOR_NAMES",
    "InceptionExtractor",
    "DINOv2Extractor",
    "CLIPExtractor",
    "TorchScriptExtractor",
    "DigitsCNN",
    "ClassifierExtractor",
    "build_extractor",
    "extract_outputs",
    "digits_extractor",
    "file_sha256",
    "cache_dir",
]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
DINOV2_DEFAULT_REPO = "facebook/dinov2-large"  # ViT-L/14, the DINOv2 of torch-fidelity's and dgm-eval's defaults
CLIP_DEFAULT_MODEL = "clip-vit-b-32"  # torch-fidelity's default CLIP extractor
DIGITS_EXTRACTOR_NAME = "digits-cnn (not Inception)"
DIGITS_CACHE_FILE = "digits-cnn-v1.pt"
EXTRACTOR_NAMES = ("inception", "dinov2", "clip", "digits")
# sFID (Nash et al. 2021, as ADM's evaluator computes it): the first 7 channels of TF Inception's `mixed_6/conv`
# (17x17), i.e. the 1x1 branch of Mixed_6d in torch-fidelity's port, flattened in TF's HWC order
SPATIAL_CHANNELS = 7


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_images(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1|3, H, W], got {x.dtype} {tuple(x.shape)}")


def _rgb(images: torch.Tensor) -> torch.Tensor:
    _check_images(images)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def extract_outputs(extractor: nn.Module, images: torch.Tensor, want: Collection[str] = ("features",)
                    ) -> dict[str, torch.Tensor]:
    """The outputs ``want`` (``features`` ``[N, d]``, ``logits`` ``[N, C]``, ``spatial`` ``[N, s]``) of one forward pass.

    Extractors without an ``extract`` method give ``features`` only. A missing output is a ``UserError`` naming
    the extractor (e.g. IS asked of DINOv2, which has no classifier).
    """
    if hasattr(extractor, "extract"):
        out = extractor.extract(images, frozenset(want))
    else:
        out = {"features": extractor(images)}
    missing = [k for k in want if k not in out]
    if missing:
        name = getattr(extractor, "name", type(extractor).__name__)
        what = {"logits": "class logits (the Inception Score needs them)",
                "spatial": "spatial features (sFID needs Inception's mixed_6/conv)"}
        raise UserError(f"extractor '{name}' gives no {', '.join(what.get(k, k) for k in missing)}; "
                        "use --extractor inception" + (" (or digits)" if missing == ["logits"] else ""))
    return out


class InceptionExtractor(nn.Module):
    """TF-port InceptionV3 pool3 features (2048-d) through torch-fidelity, TF1-exact resize to 299.

    One forward pass gives pool3 ``[N, 2048]`` and ``logits_unbiased`` ``[N, 1008]`` (the logits torch-fidelity
    and torchmetrics compute the Inception Score from) and, when asked, sFID's spatial features ``[N, 2023]``.

    Args:
        weights_path: a local ``weights-inception-2015-12-05-6726825d.pth`` (offline use). ``None``
            looks in the torch hub cache and otherwise tries the usual download.
    """

    num_features = 2048
    resize = "tf1-bilinear-299 (antialias=False)"
    provides = frozenset({"features", "logits", "spatial"})

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
                                    "and pass --weights PATH (or put it in that folder)") from None
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
                self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                         feature_extractor_weights_path=str(path))
        except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
            raise UserError(f"cannot load Inception weights from {path}: {str(err).splitlines()[0]}") from None
        self.weights_path = str(path)
        self.name = "inception-v3-compat (torch-fidelity, pool3 2048)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_rgb(images))[0]

    def extract(self, images: torch.Tensor, want: frozenset[str]) -> dict[str, torch.Tensor]:
        """``features`` ``[N, 2048]``, ``logits`` ``[N, 1008]`` and (when in ``want``) ``spatial`` ``[N, 2023]``."""
        spatial: list[torch.Tensor] = []
        hook = None
        if "spatial" in want:
            def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
                # [N, 192, 17, 17] -> first 7 channels in TF's NHWC order -> [N, 17 * 17 * 7]
                spatial.append(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float())

            hook = self.model.Mixed_6d.branch1x1.register_forward_hook(keep)
        try:
            pool, logits = self.model(_rgb(images))
        finally:
            if hook is not None:
                hook.remove()
        out = {"features": pool, "logits": logits}
        if spatial:
            out["spatial"] = spatial[0]
        return out


def _weights_file(path: Path) -> Path:
    """The weights file inside a Hugging Face model directory (for its SHA-256)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    return path


class _DinoCLS(nn.Module):
    """transformers ``Dinov2Model`` → the CLS token after the final layer norm ``[N, d]`` (the hub model's output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output


class DINOv2Extractor(nn.Module):
    """DINOv2 CLS features (FD_DINOv2, Stein et al. 2023) from a local Hugging Face snapshot.

    The network is transformers' ``Dinov2Model`` (torch-fidelity's own DINOv2 extractor loads the model code from
    GitHub through ``torch.hub``, which an offline machine cannot); the preprocessing is torch-fidelity's
    ``FeatureExtractorDinoV2.forward`` itself (TF1-exact bilinear resize to 224, ImageNet mean/std).

    Args:
        weights_path: a directory with ``config.json`` and ``model.safetensors`` (a download of
            ``facebook/dinov2-large`` or another size). ``None``: the Hugging Face cache copy of
            :data:`DINOV2_DEFAULT_REPO`.
    """

    resize = "tf1-bilinear-224 (antialias=False), ImageNet mean/std"
    provides = frozenset({"features"})
    _VARIANTS = {384: "dinov2-vit-s-14", 768: "dinov2-vit-b-14", 1024: "dinov2-vit-l-14", 1536: "dinov2-vit-g-14"}

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
        from transformers import Dinov2Model

        hint = (f"download https://huggingface.co/{DINOV2_DEFAULT_REPO} (config.json and model.safetensors) into a "
                "folder on a machine with network and pass --weights FOLDER")
        if weights_path is None:
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(DINOV2_DEFAULT_REPO, local_files_only=True))
            except Exception:  # not in the cache (offline: LocalEntryNotFoundError)
                raise UserError(f"DINOv2 weights are not in the Hugging Face cache: {hint}") from None
        else:
            path = Path(weights_path).expanduser()
            if not (path / "config.json").is_file():
                raise UserError(f"DINOv2 --weights must be a Hugging Face model folder with config.json, got {path}: "
                                f"{hint}")
        try:
            model = Dinov2Model.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"cannot load DINOv2 weights from {path}: {str(err).strip().splitlines()[0]}") from None
        dim = int(model.config.hidden_size)
        # torch-fidelity's constructor accepts only its own names and loads with torch.hub: hand it this network
        variant = self._VARIANTS.get(dim, "dinov2-vit-s-14")
        with mock.patch.object(torch.hub, "load", lambda *args, **kwargs: _DinoCLS(model)):
            self.model = FeatureExtractorDinoV2(variant, ["dinov2"])
        self.num_features = dim
        self.weights_path = str(_weights_file(path))
        self.name = f"dinov2 ({self._VARIANTS.get(dim, f'd={dim}')}, CLS; transformers Dinov2Model)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_rgb(images))[0]


def _clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an OpenAI CLIP checkpoint: a TorchScript archive (the official ``ViT-B-32.pt``) or a state dict
    (``.pt`` / ``.pth`` read with ``weights_only=True``, ``.safetensors``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except (RuntimeError, ValueError):
        pass
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err).strip()
        raise UserError(f"refusing to load CLIP weights from {path}: "
                        f"{text.splitlines()[0] if text else type(err).__name__}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a CLIP state dict")
    return state


class CLIPExtractor(nn.Module):
    """CLIP image embeddings (FD_CLIP) through torch-fidelity's ``FeatureExtractorCLIP`` (TF1-exact bilinear resize to
    the model's resolution, CLIP mean/std), from a local OpenAI CLIP checkpoint.

    Args:
        weights_path: e.g. ``ViT-B-32.pt`` from ``openaipublic.azureedge.net`` (what torch-fidelity downloads), or a
            state dict in the same (OpenAI) layout. ``None``: torch-fidelity's cached copy of ``clip-vit-b-32``.
    """

    provides = frozenset({"features"})

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_clip import MODEL_METADATA, MODEL_URLS, FeatureExtractorCLIP

        meta = MODEL_METADATA[CLIP_DEFAULT_MODEL]
        if weights_path is None:
            filename = f"{CLIP_DEFAULT_MODEL}-{meta['hash']}.pt"  # torch-fidelity's cache name
            path = Path(torch.hub.get_dir()) / "checkpoints" / filename
            if not path.is_file():
                raise UserError(f"CLIP weights {filename} are not in {path.parent}: download "
                                f"{MODEL_URLS[CLIP_DEFAULT_MODEL]} on a machine with network and pass --weights PATH "
                                "(or put it in that folder under that name)")
        else:
            path = Path(weights_path).expanduser()
            if not path.is_file():
                raise UserError(f"CLIP weights file not found: {path} (an OpenAI CLIP checkpoint, e.g. "
                                f"{MODEL_URLS[CLIP_DEFAULT_MODEL]})")
        state = _clip_state_dict(path)
        # the image tower and the projection size; the text tower and buffers (attn_mask) are not used
        visual = {k: v for k, v in state.items() if k.startswith("visual.") or k == "text_projection"}

        class _Archive:
            def state_dict(self) -> dict[str, torch.Tensor]:
                return dict(visual)

        try:
            with mock.patch.object(torch.jit, "load", lambda *args, **kwargs: _Archive()):
                self.model = FeatureExtractorCLIP(CLIP_DEFAULT_MODEL, ["clip"], feature_extractor_weights_path=str(path))
        except (RuntimeError, KeyError, ValueError, AssertionError) as err:
            raise UserError(f"cannot load CLIP weights from {path}: {str(err).strip().splitlines()[0]}") from None
        res = int(self.model.resolution)
        self.num_features = int(state["text_projection"].shape[1])
        self.resize = f"tf1-bilinear-{res} (antialias=False), CLIP mean/std"
        self.weights_path = str(path)
        self.name = f"clip-visual ({res}px, d={self.num_features}; torch-fidelity)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(_rgb(images))[0]


class TorchScriptExtractor(nn.Module):
    """A TorchScript feature network ``f(float [N, 3, H, W] in [0, 1]) -> [N, d]`` or ``([N, d], logits [N, C], ...)``."""

    resize = "none (the module's own)"
    provides = None  # a tuple output (features, logits) shows on the first batch

    def __init__(self, path: str | Path):
        super().__init__()
        self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.name = f"torchscript:{Path(path).name}"
        self.weights_path = str(path)
        self.num_features = int(getattr(self.model, "num_features", 0)) or None

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(_rgb(images).float() / 255.0)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)[0].flatten(1)

    def extract(self, images: torch.Tensor, want: frozenset[str]) -> dict[str, torch.Tensor]:
        """``features`` (first output) and ``logits`` (second output, when the module returns a tuple)."""
        out = self._run(images)
        res = {"features": out[0].flatten(1)}
        if len(out) > 1:
            res["logits"] = out[1].flatten(1)
        return res


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
    provides = frozenset({"features", "logits"})

    def __init__(self, model: nn.Module, name: str, weights_path: str | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.weights_path = weights_path
        self.num_features = int(model.head.in_features) if hasattr(model, "head") else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.model.features(_to_grey16(images, self.model.input_size))

    def extract(self, images: torch.Tensor, want: frozenset[str]) -> dict[str, torch.Tensor]:
        """``features`` ``[N, d]`` and the classifier head's ``logits`` ``[N, classes]`` of one pass."""
        feats = self(images)
        return {"features": feats, "logits": self.model.head(feats)}

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


def build_extractor(spec: str, weights: str | None = None) -> nn.Module:
    """An extractor by name or path.

    Args:
        spec: ``inception`` | ``dinov2`` | ``clip`` | ``digits`` | the path of a TorchScript file or a vkd classifier
            checkpoint.
        weights: the local weights of ``inception`` (a ``.pth``), ``dinov2`` (a Hugging Face model folder) or
            ``clip`` (an OpenAI CLIP checkpoint); ``None`` looks in the usual caches. Ignored for ``digits`` and paths.

    Raises:
        UserError: unknown name, missing or unreadable weights (the message names the file to fetch).
    """
    if spec == "inception":
        return InceptionExtractor(weights)
    if spec == "dinov2":
        return DINOv2Extractor(weights)
    if spec == "clip":
        return CLIPExtractor(weights)
    if spec == "digits":
        return digits_extractor()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"unknown extractor '{spec}': use {', '.join(EXTRACTOR_NAMES)} or the path of a TorchScript / "
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
