"""Text queries against a feature field: relevancy maps, label maps, and Gaussian selection for editing.

Per-Gaussian queries use the decoder folded into the features, ``gᵢ = W·fᵢ + b`` (spec §3), so a speed-up field
(rendered width N < M) is still queried in the teacher's text-aligned space. Selection follows Feature 3DGS's
editing rules (spec §10):

* one query: selected ⇔ ``cos(ĝᵢ, q̂) ≥ threshold``;
* a label set: ``p = softmax(raw cosines)`` (no temperature) summed over the positive labels;
  extraction selects ``p ≥ threshold`` (or ``argmax ∈ positives`` without a threshold), deletion selects
  ``argmax ∈ positives`` or ``p ≥ threshold``.

Extraction zeroes the opacity of unselected Gaussians, deletion of selected ones.

Rendered maps are queried without decoding them to the teacher's width: :class:`DecodedSpace` gives coordinates
of the N-wide rendered features in which every dot product and norm of the decoded ``W·f + b`` can be computed, so
relevancy and label maps of a frame cost ``[H, W, N + 2]`` instead of ``[H, W, M]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PROMPT_TEMPLATE", "ADE20K_LABELS", "ADE20K_MERGES", "label_prompt_template", "prompts", "parse_query", "label_scores",
           "label_map", "relevancy", "gaussian_scores", "select_gaussians", "edit_opacity_mask", "DecodedSpace"]

PROMPT_TEMPLATE = "a photo of the {}."

# The 150 ADE20K (SceneParsing) class names used by Feature 3DGS's segmentation protocol (first name of each class).
ADE20K_LABELS: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# Label merges of the protocol (spec §9): TV -> door, rug -> floor, pillow -> cushion.
ADE20K_MERGES: dict[str, str] = {"television receiver": "door", "rug": "floor", "pillow": "cushion"}


def label_prompt_template(template: str, teacher_info: dict) -> str:
    """A prompt template resolved: ``auto`` is the tiny CLIP's caption template for the embedded teacher (what its
    text tower was trained on) and the raw label name ``"{}"`` otherwise (the Feature 3DGS reference's handling)."""
    if template != "auto":
        return template
    return PROMPT_TEMPLATE if teacher_info.get("kind") == "tiny_clip" else "{}"


def prompts(labels: Sequence[str], template: str = PROMPT_TEMPLATE) -> list[str]:
    """Wrap label names in the prompt template (the one the embedded tiny CLIP was pretrained with)."""
    return [template.format(label) for label in labels]


def parse_query(query: str) -> list[str]:
    """``"red chair"`` -> ``["red chair"]``; ``"red chair, table, floor"`` -> a label set whose first item is the
    positive. Empty items are dropped."""
    items = [q.strip() for q in query.split(",")]
    return [q for q in items if q]


def label_scores(features: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of each pixel with each text embedding.

    Args:
        features: ``[B, M, H, W]`` feature maps (any norm).
        text: ``[K, M]`` text embeddings (any norm).

    Returns:
        ``[B, K, H, W]`` cosines.
    """
    if features.ndim != 4 or text.ndim != 2 or features.shape[1] != text.shape[1]:
        raise ValueError(f"features [B, M, H, W] and text [K, M] must share M, got {tuple(features.shape)} and "
                         f"{tuple(text.shape)}")
    return torch.einsum("bmhw,km->bkhw", F.normalize(features, dim=1), F.normalize(text, dim=-1))


def label_map(features: Tensor, text: Tensor, merges: dict[int, int] | None = None) -> Tensor:
    """Per-pixel argmax label ``[B, H, W]`` (int64), with optional id merges ``{from: to}``."""
    lab = label_scores(features, text).argmax(1)
    if merges:
        for src, dst in merges.items():
            lab = torch.where(lab == src, torch.full_like(lab, dst), lab)
    return lab


def relevancy(features: Tensor, query: Tensor, negatives: Tensor, temperature: float = 10.0) -> Tensor:
    """Relevancy heat map ``softmax(τ·[s_q, s_neg1, ...])[0]`` per pixel, in [0, 1].

    Args:
        features: ``[B, M, H, W]``.
        query: ``[M]`` embedding of the query.
        negatives: ``[K, M]`` embeddings of the other labels (or canonical negatives).
        temperature: τ.

    Returns:
        ``[B, H, W]``.
    """
    text = torch.cat([query[None], negatives], 0)
    return torch.softmax(temperature * label_scores(features, text), dim=1)[:, 0]


def gaussian_scores(folded: Tensor, text: Tensor) -> Tensor:
    """Cosine ``[G, K]`` between per-Gaussian teacher-space features ``[G, M]`` and text embeddings ``[K, M]``."""
    return F.normalize(folded, dim=-1) @ F.normalize(text, dim=-1).T


def select_gaussians(folded: Tensor, text: Tensor, positives: Sequence[int], threshold: float | None,
                     mode: str) -> Tensor:
    """Feature 3DGS selection rule (see module docstring).

    Args:
        folded: ``[G, M]`` per-Gaussian teacher-space features.
        text: ``[K, M]`` text embeddings: one query (K = 1) or a label set.
        positives: indices into ``text`` of the target labels.
        threshold: cosine threshold (K = 1) or summed-probability threshold (label set); may be ``None`` for a set.
        mode: ``"extract"`` or ``"delete"``.

    Returns:
        ``[G]`` bool: the selected Gaussians.
    """
    if mode not in ("extract", "delete"):
        raise ValueError(f"mode must be 'extract' or 'delete', got {mode!r}")
    scores = gaussian_scores(folded, text)  # [G, K]
    if text.shape[0] == 1:
        if threshold is None:
            raise ValueError("a single query needs a threshold")
        return scores[:, 0] >= threshold
    prob = torch.softmax(scores, dim=-1)  # raw cosines, no temperature (as the reference)
    pos = torch.as_tensor(list(positives), dtype=torch.long, device=prob.device)
    p_pos = prob[:, pos].sum(-1)
    arg_pos = torch.isin(prob.argmax(-1), pos)
    if mode == "extract":
        return p_pos >= threshold if threshold is not None else arg_pos
    return arg_pos | (p_pos >= threshold) if threshold is not None else arg_pos


def edit_opacity_mask(selected: Tensor, mode: str) -> Tensor:
    """Opacity multiplier ``[G]``: extraction keeps only ``selected``, deletion removes them."""
    keep = selected if mode == "extract" else ~selected
    return keep.float()


@dataclass
class DecodedSpace:
    """Isometric coordinates of decoded teacher-space vectors ``d = W·f + b``, computed from the N-wide ``f``.

    With the thin QR factorisation ``[W | b] = Q·R`` (``Q [M, K]`` orthonormal columns, ``R [K, N + 1]``,
    ``K = min(M, N + 1)``), ``d = Q·z`` for ``z = R·[f; 1]``. Appending one coordinate makes a pair of maps that keep
    every inner product between decoded vectors and arbitrary teacher-space vectors ``t`` (text embeddings, PCA
    axes), and every norm:

    * :meth:`features`: ``f -> [z, 0]``, so ``‖[z, 0]‖ = ‖d‖``;
    * :meth:`vectors`: ``t -> [Qᵀt, ‖t - Q·Qᵀt‖]``, so ``‖t'‖ = ‖t‖`` and ``[z, 0]·t' = d·t``.

    Hence cosines, relevancy, label maps, Gaussian selection and PCA projections computed on the mapped pair equal
    those of the decoded ``[..., M]`` tensors (up to rounding), at the cost of ``N + 2`` channels. QR (instead of
    expanding ``‖W f + b‖² = fᵀWᵀW f + 2 bᵀW f + ‖b‖²``) keeps the norm free of cancellation.

    Args:
        R: ``[K, N + 1]`` factor applied to ``[f; 1]``.
        Q: ``[M, K]`` orthonormal columns, or ``None`` for a field without a decoder (``z = f``).
    """

    R: Tensor | None  # [K, N + 1]
    Q: Tensor | None  # [M, K]

    @classmethod
    def of_decoder(cls, weight: Tensor | None, bias: Tensor | None = None) -> DecodedSpace:
        """The space of ``d = weight·f + bias`` (``weight [M, N]``, ``bias [M]``); ``weight=None``: identity."""
        if weight is None:
            return cls(None, None)
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
        A = torch.cat([weight, bias[:, None]], 1).detach().double()  # [M, N + 1]
        Q, R = torch.linalg.qr(A, mode="reduced")  # float64: the factors are reused for every pixel
        return cls(R.to(weight.dtype), Q.to(weight.dtype))

    @classmethod
    def of_field(cls, field) -> DecodedSpace:
        """The decoded space of a :class:`~vkd.feature3dgs.model.GaussianField` (its 1x1 conv decoder)."""
        if field.decoder is None:
            return cls(None, None)
        return cls.of_decoder(field.decoder.weight[:, :, 0, 0], field.decoder.bias)

    def features(self, f: Tensor, dim: int = -1) -> Tensor:
        """Rendered (or per-Gaussian) features ``[..., N, ...]`` -> coordinates ``[..., N + 2 or K + 1, ...]``."""
        x = f.movedim(dim, -1)
        if self.R is None:
            z = torch.cat([x, torch.zeros_like(x[..., :1])], -1)  # no decoder: d = f
        else:
            R = self.R.to(x.device, x.dtype)
            z = F.linear(x, R[:, :-1], R[:, -1])  # R·[f; 1]
            z = torch.cat([z, torch.zeros_like(z[..., :1])], -1)
        return z.movedim(-1, dim)

    def vectors(self, t: Tensor) -> Tensor:
        """Teacher-space vectors ``[J, M]`` -> ``[J, K + 1]`` with the same norms and inner products with
        :meth:`features`."""
        if self.Q is None:
            return torch.cat([t, torch.zeros_like(t[:, :1])], -1)
        Q = self.Q.to(t.device).double()
        td = t.double()
        inside = td @ Q  # [J, K]
        outside = (td - inside @ Q.T).norm(dim=-1, keepdim=True)  # [J, 1] part of t orthogonal to every d
        return torch.cat([inside, outside], -1).to(t.dtype)
