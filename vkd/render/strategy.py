"""Densification policy for 3D Gaussians: gsplat's ``DefaultStrategy`` with a schedule vkd owns.

Policy here, surgery in gsplat: :class:`DensifyStrategy` decides *when* to grow, prune and reset, and calls
gsplat's own selection and parameter/optimizer surgery (``DefaultStrategy._grow_gs``, ``_prune_gs``,
``gsplat.strategy.ops.reset_opa``) to do it. Differences from ``DefaultStrategy.step_post_backward``:

1. **The opacity reset fires** at every ``step > 0`` with ``step % reset_every == 0`` (while ``step <
   refine_stop_iter``), as in 3DGS. gsplat 1.5.3 writes ``step % self.reset_every == 0 & step > 0``, which
   Python parses as the chained comparison ``step % R == (0 & step) > 0``, i.e. ``... and 0 > 0``: never true;
   1.5.2 resets at step 0 too, clamping every opacity to ``2 * prune_opa`` before training has begun. Owning the
   test here gives one behaviour on every gsplat version; the rest of ``step_post_backward`` is unchanged
   between 1.5.2 and 1.5.3 (``ops.py`` is identical).
2. **Several processes** (``torch.distributed`` initialised): the per-step gradient statistics (``grad2d``,
   ``count``; ``radii`` by max) are all-reduced before they are accumulated, so every rank holds the statistics
   of the global batch, and the randomness of splitting is seeded by ``(seed, step)`` identically on every rank:
   each rank applies the same refine and the parameters stay identical (gradients of the screen-space means are
   per-camera normalised by ``n_cameras``, so the sum over ranks equals the one-process statistics).

gsplat is imported when this module is imported (slow: it probes CUDA), so import it on use.

Examples:
    >>> from vkd.render.strategy import DensifyStrategy
    >>> strategy = DensifyStrategy(reset_every=3000, refine_every=100, seed=0)  # doctest: +SKIP
    >>> state = strategy.initialize_state(scene_scale=1.0)  # doctest: +SKIP
    >>> strategy.step_post_backward(params, optimizers, state, step, meta)  # after loss.backward()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import reset_opa
from torch import Tensor

__all__ = ["DensifyStrategy", "opacity_reset_steps"]


def opacity_reset_steps(reset_every: int, refine_stop: int, steps: int) -> list[int]:
    """Strategy steps (0-based, as passed to ``step_post_backward``) at which :class:`DensifyStrategy` resets."""
    return [s for s in range(reset_every, min(refine_stop, steps), reset_every)]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def _same_rng_everywhere(seed: int, step: int, device: torch.device) -> Iterator[None]:
    """The global torch RNG seeded by ``(seed, step)`` inside, restored after (CPU and ``device``)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
        yield


@dataclass
class DensifyStrategy(DefaultStrategy):
    """``gsplat.strategy.DefaultStrategy`` whose opacity reset fires and whose refine is identical across ranks.

    Args:
        seed: seeds the split sampling of a refine step (with the step), identical on every rank.
        (the rest): as ``DefaultStrategy``.
    """

    seed: int = 0

    def step_post_backward(self, params: dict[str, torch.nn.Parameter] | torch.nn.ParameterDict,
                           optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any], step: int,
                           info: dict[str, Any], packed: bool = False) -> None:
        """After ``loss.backward()``: accumulate the statistics; refine and reset on their steps.

        Args:
            params: the Gaussian parameters (``means [N, 3]``, ...), changed in place by a refine.
            optimizers: one optimizer per parameter (their state follows the surgery).
            state: :meth:`initialize_state`'s dict.
            step: 0-based training step.
            info: the rasterizer's ``meta`` of this step (``means2d`` with its ``.grad``).
            packed: whether ``info`` is packed.
        """
        if step >= self.refine_stop_iter:
            return
        self._update_state_global(params, state, info, packed)
        if (step > self.refine_start_iter and step % self.refine_every == 0
                and step % self.reset_every >= self.pause_refine_after_reset):
            device = params["means"].device
            with _same_rng_everywhere(self.seed, step, device):
                self._grow_gs(params, optimizers, state, step)
            self._prune_gs(params, optimizers, state, step)
            state["grad2d"].zero_()
            state["count"].zero_()
            if self.refine_scale2d_stop_iter > 0:
                state["radii"].zero_()
        if step > 0 and step % self.reset_every == 0:
            reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)

    def _update_state_global(self, params: Any, state: dict[str, Any], info: dict[str, Any], packed: bool) -> None:
        """``_update_state`` on this step's statistics summed over all ranks (one rank: unchanged)."""
        if _world() == 1:
            self._update_state(params, state, info, packed=packed)
            return
        step_state: dict[str, Tensor | None] = {"grad2d": None, "count": None, "radii": None}
        self._update_state(params, step_state, info, packed=packed)
        sums = torch.stack([step_state["grad2d"], step_state["count"]])  # [2, N]
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        for i, key in enumerate(("grad2d", "count")):
            state[key] = sums[i] if state[key] is None else state[key] + sums[i]
        if self.refine_scale2d_stop_iter > 0:
            radii = step_state["radii"]
            dist.all_reduce(radii, op=dist.ReduceOp.MAX)
            state["radii"] = radii if state["radii"] is None else torch.maximum(state["radii"], radii)
