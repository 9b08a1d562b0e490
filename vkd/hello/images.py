"""Synthetic images: RDED-style selection of teacher-scored real patches, then HeLlO's image update.

Selection (hello.md §5.1, after RDED): per class, ``mipc`` real images → ``num_crop`` square
RandomResizedCrops each at ``S // factor`` → score each crop by the teacher's CE on its class (crops
resized to full size) → keep each image's best crop → keep the ``IPC·factor²`` lowest-CE crops →
stitch ``factor × factor`` crops per image. Crops are cut with ``torchvision.ops.roi_align``
(bilinear crop-and-resize of many boxes in one call). ``strategy="cluster"`` (vkd) replaces the
lowest-CE cut by one crop per k-means cluster (scikit-learn) of the teacher's penultimate features.

Image update (§5.2, vkd's reading): the stored variable is the low-resolution patch ``z`` (``S //
factor`` px), initialised to ``down(p)``; it minimises ``G = MSE(E_I(p), E_I(up(z)))`` with the
encoder frozen, where ``p`` is the source crop at full resolution. With ``factor = 1`` there is no
down-sampling, so ``G`` starts at 0 and the update is a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn
from torchvision.ops import roi_align

from vkd.errors import DataError
from vkd.hello.data import LabelledImages, as_unit

__all__ = ["Selection", "auto_factor", "random_square_boxes", "crop_boxes", "rded_select", "stitch",
           "unstitch", "image_update", "update_objective"]


@dataclass
class Selection:
    """Result of :func:`rded_select`.

    Attributes:
        labels: ``[C·IPC]`` classes of the synthetic images, class order.
        patches: ``[C·IPC·f², 3, S/f, S/f]`` the stored low-resolution patches (row-major per image), float in
            [0, 1] or uint8 (``patch_dtype``).
        scores: ``[C·IPC·f²]`` teacher CE of each kept crop.
        source_index: ``[C·IPC·f²]`` index of the real image each patch came from.
        source_boxes: ``[C·IPC·f², 4]`` its crop box (x1, y1, x2, y2) in that image's pixels.
        factor: the stitch factor f.
        data: the real images the patches were cut from (for :meth:`source_crops`).
    """

    labels: torch.Tensor
    patches: torch.Tensor
    scores: torch.Tensor
    source_index: torch.Tensor
    source_boxes: torch.Tensor
    factor: int
    data: LabelledImages | None = None

    @property
    def images(self) -> torch.Tensor:
        """``[C·IPC, 3, S, S]`` the stitched synthetic images (dtype of ``patches``)."""
        return stitch(self.patches, self.factor)

    def source_crops(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The crops of patches ``start:end`` cut again at full resolution from their real images (decoded again
        when streamed), ``[K, 3, S, S]`` float: the image-update targets, built per chunk so that they are never
        all in RAM."""
        assert self.data is not None
        idx, boxes = self.source_index[start:end], self.source_boxes[start:end]
        real = self.data.fetch(idx)
        return crop_boxes(real, boxes, torch.arange(idx.numel()), real.shape[-1])

    @property
    def sources(self) -> torch.Tensor:
        """All full-resolution source crops ``[C·IPC·f², 3, S, S]`` (small sets; see :meth:`source_crops`)."""
        return self.source_crops()


def auto_factor(image_size: int, factor: int = 0) -> int:
    """``factor`` if given, else 1 for images ≤ 64 px and 2 above (RDED uses 1 for CIFAR/Tiny-ImageNet)."""
    return factor if factor > 0 else (1 if image_size <= 64 else 2)


def random_square_boxes(n: int, num_crop: int, height: int, width: int, scale: tuple[float, float],
                        generator: torch.Generator) -> torch.Tensor:
    """``[n, num_crop, 4]`` (x1, y1, x2, y2) square boxes covering a ``scale`` fraction of the image area."""
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, num_crop, generator=generator))
    side = area.sqrt().clamp(max=min(height, width))
    x1 = torch.rand(n, num_crop, generator=generator) * (width - side)
    y1 = torch.rand(n, num_crop, generator=generator) * (height - side)
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=-1)


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crop-and-resize: ``images [N, 3, H, W]``, ``boxes [K, 4]`` of ``images[image_index]`` → ``[K, 3, size, size]``."""

    rois = torch.cat([image_index.to(boxes.dtype)[:, None], boxes], dim=1)
    # sampling_ratio=-1: adaptive number of samples per bin, i.e. area-averaging when shrinking
    return roi_align(images.float(), rois.float(), output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True).clamp(0, 1)


def stitch(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """``[M·f², 3, s, s]`` (row-major within each image) → ``[M, 3, s·f, s·f]``."""
    if factor == 1:
        return patches
    mf, c, s, _ = patches.shape
    m = mf // (factor * factor)
    x = patches.view(m, factor, factor, c, s, s).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(m, c, factor * s, factor * s)


def unstitch(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`stitch`: ``[M, 3, S, S]`` → ``[M·f², 3, S/f, S/f]``."""
    if factor == 1:
        return images
    m, c, h, _ = images.shape
    s = h // factor
    x = images.view(m, c, factor, s, factor, s).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(m * factor * factor, c, s, s)


def _last_linear(teacher: nn.Module) -> nn.Linear | None:
    linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@torch.no_grad()
def _teacher_ce(teacher: nn.Module, crops: torch.Tensor, labels: torch.Tensor, size: int,
                batch_size: int, with_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-crop CE ``[K]`` and, with ``with_features``, the teacher's embedding ``[K, D]``: the input of its
    last ``nn.Linear`` (the penultimate features of a classifier head), or its logits when it has none."""
    ces, feats = [], []
    device = next(teacher.parameters()).device
    head = _last_linear(teacher) if with_features else None
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1))) if head else None
    try:
        for s in range(0, crops.shape[0], batch_size):
            x = crops[s:s + batch_size].to(device)
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            logits = teacher(x)
            ces.append(F.cross_entropy(logits, labels[s:s + batch_size].to(device), reduction="none").cpu())
            if with_features:
                feats.append((captured.pop() if head is not None else logits).float().cpu())
                captured.clear()
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(ces), (torch.cat(feats) if with_features else None)


def _cluster_pick(features: torch.Tensor, ce: torch.Tensor, k: int, seed: int,
                  eligible: torch.Tensor | None = None) -> torch.Tensor:
    """One image per k-means cluster of ``features [n, D]``: the member nearest its centroid, among the
    ``eligible [n]`` members when the cluster has any. Returned in increasing ``ce [n]``."""

    if k >= features.shape[0]:
        return torch.argsort(ce, stable=True)
    x = F.normalize(features.double(), dim=1)  # cosine geometry: scale-free
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x.numpy())
    assign = torch.from_numpy(km.labels_).long()
    dist = (x - torch.from_numpy(km.cluster_centers_)[assign]).pow(2).sum(1)  # [n] to own centroid
    picks = []
    for cluster in range(k):
        members = (assign == cluster).nonzero().flatten()
        if eligible is not None and eligible[members].any():
            members = members[eligible[members]]
        if members.numel():
            picks.append(members[torch.argmin(dist[members])])
    chosen = torch.stack(picks)
    if chosen.numel() < k:  # k-means left a cluster empty: fill with the lowest-CE images not yet taken
        rest = torch.ones_like(ce, dtype=torch.bool)
        rest[chosen] = False
        extra = rest.nonzero().flatten()
        chosen = torch.cat([chosen, extra[torch.argsort(ce[extra], stable=True)[:k - chosen.numel()]]])
    return chosen[torch.argsort(ce[chosen], stable=True)]


def rded_select(images: torch.Tensor | LabelledImages, labels: torch.Tensor | None, teacher: nn.Module,
                num_classes: int, ipc: int, factor: int = 1, mipc: int = 300, num_crop: int = 5,
                crop_scale: tuple[float, float] = (0.5, 1.0), seed: int = 0, batch_size: int = 256,
                strategy: str = "lowest_ce", label_model: nn.Module | None = None,
                patch_dtype: torch.dtype = torch.float32, num_workers: int | None = None) -> Selection:
    """RDED selection of real patches by teacher confidence, stitched ``factor × factor``.

    The real images stream: the seeded plan (which images, which crop boxes) is drawn first, then the planned
    images are decoded in class order (DataLoader workers for a file-backed set) and each class is scored as soon as
    its images have arrived, so only one class's ``mipc`` images are in RAM at a time. The result is the same as on
    the same images held in RAM.

    Args:
        images: ``[N, 3, S, S]`` real images (float in [0, 1] or uint8), or a :class:`LabelledImages` (in RAM or
            streamed; then ``labels`` may be ``None``).
        labels: ``[N]`` their classes in ``[0, num_classes)``.
        teacher: classifier on images in [0, 1] (eval mode; run under no_grad).
        num_classes: C.
        ipc: synthetic images per class.
        factor: stitch factor f (patches are ``S // f`` px).
        mipc: real images scored per class (a seeded random subset when the class is larger).
        num_crop: random crops scored per image.
        crop_scale: area fraction range of the square crops.
        seed: selection seed; the result is a pure function of the inputs and the seed.
        batch_size: teacher batch size (and decoding batch size).
        strategy: ``lowest_ce`` (RDED: the ``IPC·f²`` most confident crops of each class) or ``cluster``
            (vkd: k-means with ``IPC·f²`` clusters on the teacher's penultimate features of each image's best
            crop, then from each cluster the crop nearest its centroid among those the teacher gives its class
            probability > 1/2: the class's modes instead of ``IPC`` near-copies of its most typical sample).
        label_model: ``cluster`` only: the model that will label the set (HeLlO's projector); a cluster's
            pick must then also get class probability > 1/2 from it, where the cluster has such a member.
        patch_dtype: ``torch.float32`` or ``torch.uint8`` (what the PNGs store: a quarter of the memory at scale).
        num_workers: decoding workers of a streamed set (default: its own setting).

    Returns:
        :class:`Selection` with ``C·IPC`` images labelled in class order.

    Raises:
        DataError: a class has fewer than ``IPC·f²`` (decodable) images (each patch comes from a distinct image).
    """
    data = images if isinstance(images, LabelledImages) else LabelledImages(images, labels, tuple(
        str(c) for c in range(num_classes)))
    labels = data.labels
    if data.images is not None:
        x = data.images
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"images must be [N, 3, S, S], got {tuple(x.shape)}")
    if labels.shape != (len(data),):
        raise ValueError(f"labels must be [N={len(data)}], got {tuple(labels.shape)}")
    if strategy not in ("lowest_ce", "cluster"):
        raise ValueError(f"strategy must be 'lowest_ce' or 'cluster', got {strategy!r}")
    size = data.image_size
    if size % factor:
        raise DataError(f"image size {size} is not divisible by the stitch factor {factor}")
    need = ipc * factor * factor
    gen = torch.Generator().manual_seed(seed)
    # 1. the plan: every random draw happens here, in class order, before any image is decoded
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < need:
            raise DataError(f"class {c} has {idx.numel()} images but IPC={ipc} with stitch factor {factor} needs "
                            f"{need} distinct images")
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:max(mipc, need)]]
        plan.append((idx, random_square_boxes(idx.numel(), num_crop, size, size, crop_scale, gen)))
    # 2. stream the planned images in class order; score each class once all of its images have arrived
    out: list[tuple[torch.Tensor, ...]] = []
    wanted = torch.cat([idx for idx, _ in plan])
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    have = 0
    # buffered as stored (uint8 when streamed) and converted per class
    stream = data.batches(wanted, batch_size=batch_size, num_workers=num_workers, keep_failed=True, unit=False)
    for c, (idx, boxes) in enumerate(plan):
        n = idx.numel()
        while have < n:
            x, _, _, ok = next(stream)
            pending.append((x, ok))
            have += x.shape[0]
        xs, oks = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
        # the next class's first images, copied so that this class's buffer can be freed
        pending, have = ([(xs[n:].clone(), oks[n:].clone())], have - n) if have > n else ([], 0)
        out.append(_select_class(as_unit(xs[:n]), oks[:n], idx, boxes, c, data, teacher, ipc, factor, num_crop, seed,
                                 batch_size, strategy, label_model, patch_dtype))
    patches, scores, src_index, boxes, out_labels = (torch.cat(parts) for parts in zip(*out, strict=True))
    return Selection(labels=out_labels, patches=patches, scores=scores, source_index=src_index, source_boxes=boxes,
                     factor=factor, data=data)


def _select_class(sub: torch.Tensor, ok: torch.Tensor, idx: torch.Tensor, boxes: torch.Tensor, c: int,
                  data: LabelledImages, teacher: nn.Module, ipc: int, factor: int, num_crop: int, seed: int,
                  batch_size: int, strategy: str, label_model: nn.Module | None, patch_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, ...]:
    """Score one class's planned images ``sub [n, 3, S, S]`` (``ok [n]``: decoded) with their boxes
    ``[n, num_crop, 4]`` and keep its ``IPC·f²`` patches."""
    need = ipc * factor * factor
    if not bool(ok.all()):  # undecodable files leave the pool; the plan (and so the RNG) is unchanged
        sub, idx, boxes = sub[ok], idx[ok], boxes[ok]
        if idx.numel() < need:
            raise DataError(f"class '{data.class_names[c]}' has {idx.numel()} decodable images among those scored, "
                            f"but IPC={ipc} with stitch factor {factor} needs {need}")
    n, size = idx.numel(), sub.shape[-1]
    small = size // factor
    boxes = boxes.reshape(-1, 4)
    which = torch.arange(n).repeat_interleave(num_crop)
    crops_small = crop_boxes(sub, boxes, which, small)  # [n·k, 3, s, s]
    ce, feats = _teacher_ce(teacher, crops_small, torch.full((n * num_crop,), c), size, batch_size,
                            with_features=strategy == "cluster")
    ce = ce.view(n, num_crop)
    best_ce, best_k = ce.min(dim=1)  # each image's best crop
    if strategy == "cluster":
        assert feats is not None
        best = torch.arange(n) * num_crop + best_k
        eligible = best_ce < math.log(2.0)  # p(class) > 1/2: the teacher's argmax is the class
        if label_model is not None:
            label_ce, _ = _teacher_ce(label_model, crops_small[best], torch.full((n,), c), size, batch_size)
            eligible &= label_ce < math.log(2.0)
        order = _cluster_pick(feats[best], best_ce, need, seed + c, eligible)
    else:
        order = torch.argsort(best_ce, stable=True)[:need]  # lowest CE first
    chosen = order * num_crop + best_k[order]
    patches = crops_small[chosen]
    if patch_dtype == torch.uint8:
        patches = (patches * 255).round_().to(torch.uint8)
    return (patches, best_ce[order], idx[order], boxes[chosen], torch.full((ipc,), c, dtype=torch.long))


def update_objective(encoder: Callable[[torch.Tensor], torch.Tensor], patches: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """``G = MSE(E_I(up(z)), E_I(p))`` for patches ``z [M, 3, s, s]`` and targets ``p [M, 3, S, S]``."""
    size = targets.shape[-1]
    up = patches if patches.shape[-1] == size else F.interpolate(patches, size=(size, size), mode="bilinear",
                                                                  align_corners=False)
    with torch.no_grad():
        target_feats = encoder(targets)
    return F.mse_loss(encoder(up), target_feats)


def image_update(encoder: Callable[[torch.Tensor], torch.Tensor], patches: torch.Tensor,
                 targets: torch.Tensor | Callable[[int, int], torch.Tensor], steps: int = 30, lr: float = 0.01,
                 batch_size: int = 256, device: str | torch.device | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Optimise the stored low-resolution patches so that their up-sampled versions encode like the originals.

    Args:
        encoder: frozen image encoder on images in [0, 1] → ``[B, D]`` (its parameters are not updated).
        patches: ``[M, 3, s, s]`` initial patches ``z₀ = down(p)``, float in [0, 1] or uint8 (then the result is
            uint8 too: the PNGs store 8 bits anyway).
        targets: ``[M, 3, S, S]`` full-resolution source crops ``p``, or ``targets(start, end)`` returning those of
            patches ``start:end`` (built per chunk, never all in RAM).
        steps: Adam steps (0 returns the input).
        lr: Adam learning rate in [0, 1] pixel space.
        batch_size: patches per optimisation chunk.
        device: where each chunk is optimised (default: where ``patches`` are).

    Returns:
        ``(patches [M, 3, s, s] in [0, 1] (dtype of the input), {"g_before", "g_after"})``.
    """
    if torch.is_tensor(targets) and patches.shape[0] != targets.shape[0]:
        raise ValueError(f"patches {tuple(patches.shape)} and targets {tuple(targets.shape)} differ in length")
    get = (lambda a, b: targets[a:b]) if torch.is_tensor(targets) else targets
    out = patches.detach().clone()
    dev = torch.device(device) if device is not None else patches.device
    g_before = g_after = 0.0
    for s in range(0, out.shape[0], batch_size):
        e = min(s + batch_size, out.shape[0])
        z = as_unit(out[s:e].to(dev)).clone().requires_grad_(True)
        p = as_unit(get(s, e).to(dev))
        with torch.no_grad():
            g_before += float(update_objective(encoder, z, p)) * z.shape[0]
        if steps > 0:
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                loss = update_objective(encoder, z, p)
                # grad w.r.t. z only: the encoder's (LoRA) parameters get no .grad
                (z.grad,) = torch.autograd.grad(loss, [z])
                opt.step()
                with torch.no_grad():
                    z.clamp_(0, 1)
        with torch.no_grad():
            g_after += float(update_objective(encoder, z, p)) * z.shape[0]
        z = z.detach().to(out.device)
        out[s:e] = (z * 255).round_().to(torch.uint8) if out.dtype == torch.uint8 else z
    m = max(1, out.shape[0])
    return out, {"g_before": g_before / m, "g_after": g_after / m}
