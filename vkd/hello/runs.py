"""Reopen a HeLlO run: its config, the shipped projector (CLIP + LoRA adapters), the final teacher and the distilled
set, each checked against the dataset it is evaluated on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vkd.engine.runs import open_run, resolve_device
from vkd.errors import DataError
from vkd.hello.config import HelloConfig
from vkd.hello.data import LabelledImages, load_splits, prompt_names, read_distilled_set
from vkd.hello.model import Classifier
from vkd.hello.projector import build_clip, load_adapters, read_adapter_meta
from vkd.hello.teacher import resolve_teachers

__all__ = ["HelloRun", "load_run", "ADAPTERS_FILE"]

ADAPTERS_FILE = "projector_adapters.safetensors"


@dataclass
class HelloRun:
    """A finished ``vkd distill hello`` run, ready to evaluate on ``device``.

    Attributes:
        images: distilled images ``[N, 3, S, S]`` uint8 (as the PNGs store them); ``labels`` ``[N]``; ``manifest``
            their manifest.
        train, test: the real splits (streamed when file-backed).
        projector: the CLIP + LoRA label projector exactly as shipped (adapter factors at their stored precision).
        teacher: the final teacher (``[B, 3, S, S] -> [B, K]`` logits).
        adapter_meta: the metadata stored with the adapters (class names, CLIP model, ...).
    """

    cfg: HelloConfig
    run_dir: Path
    device: torch.device
    train: LabelledImages
    test: LabelledImages
    teacher: Classifier
    projector: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    manifest: dict[str, Any]
    adapter_meta: dict[str, Any]

    @property
    def adapters(self) -> Path:
        return self.run_dir / ADAPTERS_FILE


def load_run(run_dir: str | Path, cfg: HelloConfig | None = None, overrides: list[str] | tuple[str, ...] = (),
             progress: bool = True) -> HelloRun:
    """Load a HeLlO run directory (``cfg``: its config, else ``run_dir/config.yaml`` plus ``overrides``).

    Raises:
        DataError: the run has no adapters yet, or its projector / distilled set were made for other classes.

    Examples:
        >>> run = load_run("runs/hello/default")  # doctest: +SKIP
        >>> run.images.shape, run.projector(run.images[:2].float() / 255).shape  # doctest: +SKIP
        (torch.Size([100, 3, 16, 16]), torch.Size([2, 10]))
    """
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else open_run(run_dir, HelloConfig, "hello", overrides)
    dev = resolve_device(cfg.eval.device)
    adapters = run_dir / ADAPTERS_FILE
    if not adapters.is_file():
        raise DataError(f"{run_dir} has no {ADAPTERS_FILE}; run `vkd distill hello` to completion first")
    train, test = load_splits(cfg.data)
    meta = read_adapter_meta(adapters)
    if list(meta["class_names"]) != prompt_names(train.class_names):
        raise DataError(f"projector adapters in {run_dir} were fitted for different classes than the dataset")
    _, final, _ = resolve_teachers(cfg, train)
    clip = build_clip(cfg, train, device=dev, progress=progress)
    projector = load_adapters(adapters, clip, device=dev)  # evaluate exactly what is shipped (e.g. fp16 factors)
    images, labels, manifest = read_distilled_set(run_dir / "distilled", dtype=torch.uint8)
    if list(manifest["class_names"]) != list(train.class_names):
        raise DataError(f"distilled set in {run_dir} has different classes than the dataset")
    return HelloRun(cfg, run_dir, dev, train, test, final.to(dev), projector, images, labels, manifest, meta)
