"""The one training loop of vkd, on ``accelerate`` so it runs on a CPU and under ``torchrun`` /
``accelerate launch`` on many GPUs unchanged.

Determinism: the data order is a pure function of ``(seed, step)`` (see :class:`GlobalBatchSampler`)
and the global RNGs are reseeded from ``(seed, step, rank)`` at every step, so a run resumed from a
checkpoint reproduces the uninterrupted run exactly, and ``N`` processes with the same global batch
reproduce the single-process run up to float reduction order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from vkd.config import TaskConfig, TrainConfig, save_config
from vkd.engine.checkpoint import (
    BEST_DIR,
    CheckpointWriteError,
    latest_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    load_training_state,
    read_best,
    remove_stale,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from vkd.engine.ema import EMA
from vkd.engine.precision import resolve_mixed_precision
from vkd.engine.task import DistillationTask
from vkd.errors import ConfigError, DataError, NonFiniteError, TrainingInterrupted, UserError

__all__ = ["Trainer", "train_task", "GlobalBatchSampler", "step_seed", "seeded"]


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed that depends on (seed, step, rank) and nothing else."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch from ``seed`` for a block and restore the previous RNG states afterwards.

    Tasks build their models inside it, so that the initial weights are a function of ``run.seed`` alone and
    not of whatever the process drew before (an earlier run in the same process, a data generator, a test).
    """
    state = rng_state()
    _seed_everything(seed)
    try:
        yield
    finally:
        set_rng_state(state)


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Use ``num_threads`` intra-op CPU threads for a block (0: leave torch's setting) and restore the previous count.

    ``torch.set_num_threads`` is process-wide: a task that wants 1 thread (many small ops) must not leave a later
    task in the same process (``vkd demo``, a notebook) running its large convolutions on one core.
    """
    previous = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class GlobalBatchSampler:
    """Yields this process's share of each global batch, forever, starting at ``start_step``.

    The index stream is the concatenation of per-epoch permutations ``randperm(n, seed + epoch)``;
    global batch ``k`` is ``stream[k·B : (k+1)·B]``. Each global batch is cut into
    ``world_size × grad_accum`` equal chunks and chunk ``micro · world_size + rank`` belongs to this
    process's micro-step ``micro``. Nothing depends on history, so resuming at a step is exact.
    """

    def __init__(self, num_samples: int | None, global_batch: int, world_size: int = 1, rank: int = 0,
                 grad_accum: int = 1, seed: int = 0, start_step: int = 0, shuffle: bool = True):
        if global_batch % (world_size * grad_accum):
            raise UserError(f"train.batch_size={global_batch} must be divisible by processes × grad_accum "
                            f"= {world_size} × {grad_accum}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.start_step = start_step
        self.shuffle = shuffle
        self.local_batch = global_batch // (world_size * grad_accum)
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            assert self.num_samples is not None
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm_cache[epoch] = torch.randperm(self.num_samples, generator=gen)
            else:
                self._perm_cache[epoch] = torch.arange(self.num_samples)
        return self._perm_cache[epoch]

    def positions(self, step: int, micro: int) -> range:
        """Positions in the global stream that this rank's micro-batch covers."""
        chunk = micro * self.world_size + self.rank
        start = step * self.global_batch + chunk * self.local_batch
        return range(start, start + self.local_batch)

    def indices(self, step: int, micro: int) -> list[int]:
        positions = self.positions(step, micro)
        if self.num_samples is None:  # data-free: the positions are the sample ids
            return list(positions)
        out = []
        for pos in positions:
            epoch, offset = divmod(pos, self.num_samples)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for micro in range(self.grad_accum):
                yield self.indices(step, micro)
            step += 1


class _IndexBatches:
    """Dataset-free stand-in: each batch is the LongTensor of global sample ids."""

    def __init__(self, sampler: GlobalBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[torch.Tensor]:
        for idx in self.sampler:
            yield torch.tensor(idx, dtype=torch.long)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return factor


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise RuntimeError("the task has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # train.fused_optimizer: torch's fused kernel (CPU and CUDA), the same update with reassociated arithmetic;
    # on a 2-core CPU one Adam step over CSRNet's 16 M parameters takes a fraction of the per-tensor default's
    fused = cfg.fused_optimizer and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused or None)


def _as_dict(obj: Any, name: str = "main") -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    return {name: obj}


class Trainer:
    """Runs a :class:`DistillationTask` for ``cfg.steps`` optimizer steps.

    Args:
        task: the task module (teacher + student + losses).
        cfg: training options.
        run_dir: where ``checkpoints/``, ``metrics.jsonl``, ``samples/`` and ``summary.json`` go.
        train_dataset: a map-style dataset, or ``None`` for data-free tasks (batches are sample ids).
        collate_fn: batches a list of dataset items (default: ``torch.utils.data.default_collate``).
        seed: the run's seed (data order, per-step RNG).
        shuffle: shuffle the dataset each epoch.
    """

    def __init__(self, task: DistillationTask, cfg: TrainConfig, run_dir: str | Path,
                 train_dataset: Dataset | None = None, collate_fn: Callable | None = None, seed: int = 0,
                 shuffle: bool = True):
        self.task = task
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dataset = train_dataset
        self.collate_fn = collate_fn or default_collate
        self.seed = seed
        self.shuffle = shuffle
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------------------
    def _make_accelerator(self):
        # imported on use: accelerate takes seconds to import, and evaluation-only commands import vkd.engine
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available

        AcceleratorState._reset_state()  # allow several trainings in one process (demo, tests)
        cpu = self.cfg.device == "cpu" or (self.cfg.device == "auto" and not torch.cuda.is_available())
        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available")
        log_with = ["tensorboard"] if is_tensorboard_available() else None
        kwargs = [DistributedDataParallelKwargs(find_unused_parameters=self.task.find_unused_parameters)]
        device = "cpu" if cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        precision = resolve_mixed_precision(self.cfg.mixed_precision, device)
        return Accelerator(cpu=cpu, mixed_precision=precision, log_with=log_with,
                           project_dir=str(self.run_dir), kwargs_handlers=kwargs)

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self._stop_signal = signum

    # ------------------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train, checkpointing and logging along the way.

        Args:
            resume: ``None`` (fresh run), ``"latest"`` (newest checkpoint in the run dir, or fresh if
                there is none) or a checkpoint directory.

        Returns:
            The summary dict that is also written to ``summary.json``.

        Raises:
            NonFiniteError: a non-finite loss or gradient (the run dir keeps its last good checkpoint).
            TrainingInterrupted: SIGINT/SIGTERM; a checkpoint of the current step was written first.
        """
        cfg = self.cfg
        acc = self._make_accelerator()
        main = acc.is_main_process
        world, rank = acc.num_processes, acc.process_index
        ckpt_dir = self.run_dir / "checkpoints"
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "samples").mkdir(exist_ok=True)
            remove_stale(ckpt_dir)  # leftovers of a process killed while writing or pruning checkpoints

        task = self.task.to(acc.device)

        # ---- resume --------------------------------------------------------------------------
        resume_path = self._resume_path(acc, resume)
        start_step, state = _load_task_state(task, resume_path)
        # Built after the weights are loaded: the task may have resized parameters (densification).
        optimizers, schedulers = self._optimizers(task)
        ema = EMA(task.student_module(), cfg.ema_decay, task.ema_state_keys()) if cfg.ema_decay > 0 else None
        if resume_path is not None:
            _load_optimizer_state(state, resume_path, optimizers, schedulers, ema, rank)

        if start_step >= cfg.steps:
            acc.print(f"checkpoint is at step {start_step} >= train.steps={cfg.steps}: nothing to train")
        best = self._best_record(task, resume_path)

        manual_sync = task.manual_gradient_sync and acc.num_processes > 1
        if manual_sync:  # parameters change shape in training: DDP cannot hold them, sync by hand
            _broadcast_from_main(task)
            model = task
        else:
            model = acc.prepare_model(task)
        prepared = {name: acc.prepare_optimizer(opt) for name, opt in optimizers.items()}
        unwrapped: DistillationTask = acc.unwrap_model(model)

        batches = self._batches(world, rank, start_step)

        trackers = acc.log_with if hasattr(acc, "log_with") else None
        if trackers:
            acc.init_trackers("tensorboard")

        metrics_path = self.run_dir / "metrics.jsonl"
        bar = tqdm(total=cfg.steps, initial=start_step, desc=self.run_dir.name, dynamic_ncols=True, disable=None,
                   file=sys.stderr) if main else None

        previous_handlers = self._install_signal_handlers()
        last_ckpt = latest_checkpoint(self.run_dir)
        last_logged: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        t_start = time.time()
        t_window, steps_window = time.time(), 0
        step = start_step
        anomaly = torch.autograd.set_detect_anomaly(True) if cfg.detect_anomaly else contextlib.nullcontext()
        try:
            with anomaly:
                while step < cfg.steps:
                    _seed_everything(step_seed(self.seed, step, rank))
                    model.train()
                    outputs, sums = self._forward_backward(acc, model, batches, step, last_ckpt)
                    if manual_sync:
                        _all_reduce_gradients(unwrapped.trainable_parameters(), acc.num_processes)
                    unwrapped.on_before_optimizer_step(step)
                    grad_norm = self._grad_norm(acc, prepared)
                    self._check_finite(acc, grad_norm, step, "gradient norm", None, last_ckpt)
                    for name, opt in prepared.items():
                        opt.step()
                        if schedulers.get(name) is not None:
                            schedulers[name].step()
                        opt.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(unwrapped.student_module())
                    step += 1
                    steps_window += 1
                    unwrapped.on_step_end(step, outputs, optimizers)

                    if step % cfg.log_every == 0 or step == cfg.steps:
                        steps_per_s = steps_window / max(time.time() - t_window, 1e-9)
                        last_logged = self._log_step(acc, step, sums, grad_norm, prepared, steps_per_s,
                                                     time.time() - t_start, metrics_path, trackers, bar)
                        t_window, steps_window = time.time(), 0
                    if bar is not None:
                        bar.update(1)

                    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                        if cfg.select_best:  # before the checkpoint: a resume from it keeps this record
                            best = self._validate(acc, unwrapped, ema, step, best, metrics_path, trackers)
                        last_ckpt = self._save(acc, unwrapped, optimizers, schedulers, ema, step) or last_ckpt
                    if cfg.sample_every and step % cfg.sample_every == 0 and step != cfg.steps:
                        self._samples(acc, unwrapped, ema, step)
                    if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                        eval_metrics = self._evaluate(acc, unwrapped, ema, step, metrics_path, trackers)
                    if self._should_stop(acc):
                        if step % cfg.checkpoint_every != 0 and step != cfg.steps:
                            last_ckpt = self._save(acc, unwrapped, optimizers, schedulers, ema, step) or last_ckpt
                        raise TrainingInterrupted(
                            f"interrupted by {signal.Signals(self._stop_signal or signal.SIGINT).name} at step "
                            f"{step}; checkpoint saved at {last_ckpt}; continue with --resume",
                            step=step, checkpoint=str(last_ckpt))
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()

        final_ema = ema
        if best is not None:  # samples, the final evaluation and the export are of the selected weights
            unwrapped.load_checkpoint_state_dict(load_checkpoint_weights(self.run_dir / BEST_DIR))
            final_ema = None  # best/ holds the weights that were validated (the EMA's, when there is one)
        self._samples(acc, unwrapped, final_ema, step)
        eval_metrics = self._evaluate(acc, unwrapped, final_ema, step, metrics_path, trackers) or eval_metrics
        if main:
            unwrapped.export(self.run_dir)
        if trackers:  # not acc.end_training(): it also destroys the process group
            for tracker in acc.trackers:
                tracker.finish()
        summary = {
            "status": "finished", "steps": step, "final": last_logged, "eval": eval_metrics,
            "wall_time_s": time.time() - t_start, "resumed_from": str(resume_path) if resume_path else None,
            "mixed_precision": str(acc.mixed_precision),  # what train.mixed_precision=auto resolved to
            "checkpoint": str(last_ckpt) if last_ckpt else None, "world_size": world, "device": str(acc.device),
        }
        if best is not None:
            summary["best"] = {k: best[k] for k in ("step", "metric", "value", "mode")} | {
                "path": str(self.run_dir / BEST_DIR)}
        if main:
            _write_json(self.run_dir / "summary.json", summary)
        acc.wait_for_everyone()
        return summary

    # ------------------------------------------------------------------------------------------
    def _resume_path(self, acc: Any, resume: str | Path | None) -> Path | None:
        """The checkpoint ``resume`` names (``"latest"``: the newest that verifies), or ``None`` for a fresh run."""
        if resume == "latest":
            # the newest checkpoint that verifies: one damaged after it was written (disk fault, a user's copy)
            # costs the steps since the previous checkpoint instead of the whole run
            resume_path, corrupt = latest_valid_checkpoint(self.run_dir)
            if resume_path is None and corrupt:
                raise DataError(f"no intact checkpoint to resume from: {corrupt[0][1]}")
            for path, reason in corrupt:
                acc.print(f"vkd: warning: skipping corrupt checkpoint {path.name}: {reason}", file=sys.stderr)
            return resume_path
        if resume is not None:
            resume_path = Path(resume)
            if not resume_path.is_dir():
                raise UserError(f"checkpoint to resume from not found: {resume_path}")
            return resume_path
        return None

    def _batches(self, world: int, rank: int, start_step: int) -> Iterator[Any]:
        """This rank's batches from ``start_step`` on (index batches for data-free tasks)."""
        cfg = self.cfg
        sampler = GlobalBatchSampler(len(self.dataset) if self.dataset is not None else None,
                                     cfg.batch_size, world, rank, cfg.grad_accum, self.seed, start_step,
                                     self.shuffle)
        if self.dataset is None:
            return iter(_IndexBatches(sampler))
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=cfg.num_workers, persistent_workers=False,
                            worker_init_fn=_worker_init(self.seed) if cfg.num_workers else None)
        return iter(loader)

    def _forward_backward(self, acc: Any, model: nn.Module, batches: Iterator[Any], step: int,
                          last_ckpt: Path | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``grad_accum`` micro-batches of forward + backward (gradients synchronised on the last one).

        Returns:
            the last micro-batch's outputs, and the scalar outputs averaged over the micro-batches.
        """
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(batches), acc.device)
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(model)
            with sync:
                with acc.autocast():
                    outputs = model(batch)
                if not isinstance(outputs, dict) or "loss" not in outputs:
                    raise TypeError("task.forward must return a dict with a 'loss' entry")
                loss = outputs["loss"]
                self._check_finite(acc, loss, step, "loss", outputs, last_ckpt)
                try:
                    acc.backward(loss / cfg.grad_accum)
                except RuntimeError as err:
                    # anomaly mode raises in backward at the op that made a NaN (torch has just printed that
                    # op's forward traceback): the same exit 3 as without it
                    if not (cfg.detect_anomaly and "nan values" in str(err)):
                        raise
                    first = str(err).strip().splitlines()[0]
                    self._stop_non_finite(acc, step, f"gradient ({first})", outputs, last_ckpt)
            for key, value in outputs.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    sums[key] = sums.get(key, 0.0) + value.detach().float() / cfg.grad_accum
        return outputs, sums

    def _log_step(self, acc: Any, step: int, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor,
                  optimizers: dict[str, Any], steps_per_s: float, elapsed_s: float, metrics_path: Path,
                  trackers: Any, bar: Any) -> dict[str, float]:
        """Average the step's losses over processes, append them to ``metrics.jsonl`` and TensorBoard."""
        keys = sorted(sums)
        stacked = torch.stack([sums[k] for k in keys]).to(acc.device)
        reduced = acc.reduce(stacked, reduction="mean") if acc.num_processes > 1 else stacked
        logged = {k: float(v) for k, v in zip(keys, reduced.cpu(), strict=True)}
        record = {"step": step, **logged, "grad_norm": float(grad_norm), "lr": _first_lr(optimizers),
                  "steps_per_s": steps_per_s, "time": elapsed_s}
        if acc.is_main_process:
            _append_jsonl(metrics_path, record)
            if trackers:
                acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
            if bar is not None:
                bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.4g}")
        return logged

    def _optimizers(self, task: DistillationTask) -> tuple[dict[str, Any], dict[str, Any]]:
        spec = task.configure_optimizers(self.cfg)
        schedulers: Any = None
        if isinstance(spec, tuple):
            spec, schedulers = spec
        if spec is None:
            spec = build_optimizer(task.trainable_parameters(), self.cfg)
            schedulers = torch.optim.lr_scheduler.LambdaLR(spec, _lr_lambda(self.cfg))
        optimizers = _as_dict(spec)
        schedulers = _as_dict(schedulers)
        return optimizers, {name: schedulers.get(name) for name in optimizers}

    def _grad_norm(self, acc: Any, optimizers: dict[str, Any]) -> torch.Tensor:
        params = [p for opt in optimizers.values() for group in opt.param_groups for p in group["params"]
                  if p.grad is not None]
        if not params:
            return torch.zeros((), device=acc.device)
        if self.cfg.grad_clip > 0:
            return acc.clip_grad_norm_(params, self.cfg.grad_clip)
        grads = [p.grad.detach() for p in params]
        norms = torch._foreach_norm(grads)
        return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))

    def _check_finite(self, acc: Any, value: torch.Tensor, step: int, what: str,
                      outputs: dict[str, Any] | None, last_ckpt: Path | None) -> None:
        bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1)
        if acc.num_processes > 1:
            bad = acc.reduce(bad.to(acc.device), reduction="sum")
        if float(bad) > 0:
            self._stop_non_finite(acc, step, what, outputs, last_ckpt)

    def _stop_non_finite(self, acc: Any, step: int, what: str, outputs: dict[str, Any] | None,
                         last_ckpt: Path | None) -> None:
        parts = ""
        if outputs:
            parts = " (" + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in outputs.items()
                                     if torch.is_tensor(v) and v.numel() == 1) + ")"
        where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        message = f"non-finite {what} at step {step + 1}{parts}; training stopped, {where}"
        if acc.is_main_process:
            _write_json(self.run_dir / "summary.json",
                        {"status": "non-finite", "step": step + 1, "message": message,
                         "checkpoint": str(last_ckpt) if last_ckpt else None})
        raise NonFiniteError(message, step=step + 1)

    def _should_stop(self, acc: Any) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        return float(flag) > 0

    def _save(self, acc: Any, task: DistillationTask, optimizers: dict[str, Any], schedulers: dict[str, Any],
              ema: EMA | None, step: int) -> Path | None:
        from accelerate.utils import gather_object  # on use, as in _make_accelerator

        states = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        path = None
        error: str | None = None
        if acc.is_main_process:
            training_state = {
                "step": step,
                "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                "schedulers": {name: s.state_dict() for name, s in schedulers.items() if s is not None},
                "rng": states,
                "extra": task.extra_state_dict(),
            }
            try:
                path = save_checkpoint(self.run_dir / "checkpoints", step, task.checkpoint_state_dict(),
                                       training_state, ema.state_dict() if ema is not None else None,
                                       keep_last=self.cfg.keep_last, extra_meta={"world_size": acc.num_processes})
            except CheckpointWriteError as err:
                error = str(err)
        if acc.num_processes > 1:
            error = gather_object([error])[0]
        acc.wait_for_everyone()
        if error:
            previous = list_checkpoints(self.run_dir / "checkpoints")
            keep = f"; previous checkpoint intact: {previous[-1][1]}" if previous else ""
            raise UserError(error + keep)
        return path

    def _best_record(self, task: DistillationTask, resume_path: Path | None) -> dict[str, Any] | None:
        """The best validation record to continue from (``best/meta.json`` on resume), after checking the metric.

        A fresh run drops a ``best/`` left by an earlier run in the same directory (``--overwrite``).
        """
        cfg = self.cfg
        if resume_path is None and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(self.run_dir / BEST_DIR, ignore_errors=True)  # not this run's: never evaluate or export it
        if not cfg.select_best:
            return None
        if cfg.select_best not in task.validation_metrics:
            offered = ", ".join(task.validation_metrics) or "none: the task has no validation split"
            raise ConfigError(f"train.select_best={cfg.select_best!r} is not a validation metric of this task "
                              f"({offered})")
        if resume_path is None:
            return None
        best = read_best(self.run_dir)
        if best is not None and (best.get("metric") != cfg.select_best or best.get("mode") != cfg.select_mode
                                 or int(best.get("step", 0)) > int(verify_checkpoint(resume_path)["step"])):
            # another metric or direction, or a best from after the resumed step: it is not this run's record
            if int(os.environ.get("RANK", "0")) == 0:
                shutil.rmtree(self.run_dir / BEST_DIR, ignore_errors=True)
            return None
        return best

    def _validate(self, acc: Any, task: DistillationTask, ema: EMA | None, step: int, best: dict[str, Any] | None,
                  metrics_path: Path, trackers: Any) -> dict[str, Any] | None:
        """Validation metrics at ``step``; ``best/`` is rewritten when ``train.select_best`` improved."""
        cfg = self.cfg
        record = best
        if acc.is_main_process:
            with _maybe_ema(task, ema):
                task.eval()
                with torch.no_grad():
                    metrics = {k: float(v) for k, v in (task.validate(step) or {}).items()}
                if cfg.select_best not in metrics:
                    raise RuntimeError(f"task.validate returned no {cfg.select_best!r} (it returned "
                                       f"{', '.join(metrics) or 'nothing'})")
                value = metrics[cfg.select_best]
                _append_jsonl(metrics_path, {"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
                if trackers:
                    acc.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
                better = best is None or (value < best["value"] if cfg.select_mode == "min" else value > best["value"])
                if better and math.isfinite(value):
                    try:
                        save_best(self.run_dir, step, task.checkpoint_state_dict(), task.extra_state_dict(),
                                  cfg.select_best, value, cfg.select_mode)
                    except CheckpointWriteError as err:
                        raise UserError(str(err)) from None
                    record = {"step": step, "metric": cfg.select_best, "value": value, "mode": cfg.select_mode}
        acc.wait_for_everyone()
        if acc.num_processes > 1:  # every rank loads best/ at the end: they must agree that there is one
            from accelerate.utils import broadcast_object_list

            box = [record]
            broadcast_object_list(box, from_process=0)
            record = box[0]
        return record

    def _samples(self, acc: Any, task: DistillationTask, ema: EMA | None, step: int) -> None:
        if acc.is_main_process:
            with torch.no_grad(), _maybe_ema(task, ema):
                task.eval()
                task.save_samples(step, self.run_dir / "samples")
        acc.wait_for_everyone()

    def _evaluate(self, acc: Any, task: DistillationTask, ema: EMA | None, step: int, metrics_path: Path,
                  trackers: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if acc.is_main_process:
            with _maybe_ema(task, ema):
                task.eval()
                metrics = {k: float(v) for k, v in (task.evaluate(step) or {}).items()}
            if metrics:
                _append_jsonl(metrics_path, {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
                if trackers:
                    acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        acc.wait_for_everyone()
        return metrics


def _load_task_state(task: DistillationTask, resume_path: Path | None) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint's weights and extra state into ``task``: ``(its step, its training state)``."""
    if resume_path is None:
        return 0, {}
    meta = verify_checkpoint(resume_path)
    task.load_checkpoint_state_dict(load_checkpoint_weights(resume_path))
    state = load_training_state(resume_path)
    task.load_extra_state_dict(state.get("extra", {}))
    return int(meta["step"]), state


def _load_optimizer_state(state: dict[str, Any], resume_path: Path, optimizers: dict[str, Any],
                          schedulers: dict[str, Any], ema: EMA | None, rank: int) -> None:
    """Restore optimizers, schedulers, the EMA and this rank's RNG state from a checkpoint."""
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, sched in schedulers.items():
        if sched is not None and name in state.get("schedulers", {}):
            sched.load_state_dict(state["schedulers"][name])
    if ema is not None and (resume_path / "ema.safetensors").is_file():
        ema.load_state_dict(load_checkpoint_weights(resume_path, "ema.safetensors"))
    rng = state.get("rng", [])
    if rank < len(rng):
        set_rng_state(rng[rank])


def _broadcast_from_main(task: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a module)."""
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*task.parameters(), *task.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _all_reduce_gradients(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients over processes in one flat all-reduce (DDP's semantics, without its fixed buckets)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not params:
        return
    # a parameter that got a gradient on any rank gets one (zeros where missing) on all, so the flat sizes agree;
    # one unused everywhere keeps grad None (no optimizer step), as on one process
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for p, used in zip(params, has_grad.tolist(), strict=True):
        if used and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(synced)


@contextlib.contextmanager
def _maybe_ema(task: DistillationTask, ema: EMA | None):
    if ema is None:
        yield
        return
    with ema.swapped_into(task.student_module()):
        yield


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _worker_init(seed: int) -> Callable[[int], None]:
    def init(worker_id: int) -> None:
        _seed_everything(step_seed(seed, -1 - worker_id, int(os.environ.get("RANK", 0))))

    return init


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(moved) if isinstance(batch, tuple) and not hasattr(batch, "_fields") else moved
    return batch


def _first_lr(optimizers: dict[str, Any]) -> float:
    for opt in optimizers.values():
        return float(opt.param_groups[0]["lr"])
    return 0.0


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def train_task(cfg: TaskConfig, task: DistillationTask, train_dataset: Dataset | None = None,
               resume: str | Path | None = None, collate_fn: Callable | None = None, overwrite: bool = False,
               shuffle: bool = True) -> dict[str, Any]:
    """Train ``task`` in ``cfg.run_dir()``: save ``config.yaml``, run the :class:`Trainer`, return the summary.

    Args:
        cfg: the task's resolved config.
        task: the task module.
        train_dataset: map-style dataset, or ``None`` for data-free tasks.
        resume: ``None``, ``"latest"`` or a checkpoint path.
        collate_fn: optional batch collation.
        overwrite: allow a fresh run in a directory that already holds checkpoints (they are kept
            until the new run's checkpoints replace them by ``keep_last``).
        shuffle: shuffle the data each epoch.

    Returns:
        the run summary (also written to ``summary.json``): ``status``, ``steps``, ``final`` (last logged losses),
        ``eval``, ``wall_time_s``, ``checkpoint``, ...

    Examples:
        >>> import tempfile
        >>> from vkd.config import load_config
        >>> from vkd.engine.toy import ToyConfig, ToyTask, make_toy_data
        >>> out = tempfile.mkdtemp()
        >>> cfg = load_config(ToyConfig, None, ["train.steps=20", "train.checkpoint_every=10",
        ...                                     f"run.output_dir={out}"])
        >>> train_task(cfg, ToyTask(cfg), make_toy_data(cfg))["steps"]
        20
        >>> cfg = load_config(ToyConfig, None, ["train.steps=30", f"run.output_dir={out}"])
        >>> train_task(cfg, ToyTask(cfg), make_toy_data(cfg), resume="latest")["resumed_from"].endswith("20")
        True
    """
    run_dir = cfg.run_dir()
    if resume is None and not overwrite and list_checkpoints(run_dir / "checkpoints"):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or choose another "
                        f"name with --set run.name=NAME")
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None or not (run_dir / "config.yaml").exists():
            save_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(task, cfg.train, run_dir, train_dataset, collate_fn, seed=cfg.run.seed, shuffle=shuffle)
    return trainer.fit(resume=resume)
