"""Reopen an SKT run (``skt-teacher`` or ``skt``): its config and its deployable CSRNet."""

from __future__ import annotations

from pathlib import Path

from vkd.engine import latest_checkpoint, load_checkpoint_weights
from vkd.engine.runs import open_run, run_task_name
from vkd.errors import DataError, UserError
from vkd.skt.config import CSRNetConfig, SKTConfig, SKTTeacherConfig
from vkd.skt.models import CSRNet

__all__ = ["RUN_EXPORT", "RUN_CONFIGS", "load_run"]

# Where a run's deployable network is written (weights + a small JSON describing the architecture).
RUN_EXPORT = Path("export") / "model.safetensors"

# task -> (its config class, the config section of the trained network, which is also its checkpoint key prefix)
RUN_CONFIGS: dict[str, tuple[type[SKTTeacherConfig] | type[SKTConfig], str]] = {
    "skt-teacher": (SKTTeacherConfig, "model"),
    "skt": (SKTConfig, "student"),
}


def load_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()
             ) -> tuple[SKTTeacherConfig | SKTConfig, CSRNet]:
    """The config and the deployable network of a ``skt-teacher`` or ``skt`` run.

    Reads ``run_dir/config.yaml`` (plus ``overrides``) and the exported weights (``export/model.safetensors``)
    or, if training has not finished, the latest checkpoint.

    Returns:
        ``(cfg, model)`` with the model in eval mode on the CPU.

    Raises:
        UserError: not a run directory, or the run of another task.
        DataError: no weights yet, or weights that do not fit the configured CSRNet.

    Examples:
        >>> cfg, model = load_run("runs/skt/synthetic")  # doctest: +SKIP
        >>> model(torch.rand(1, 3, 96, 96)).shape  # doctest: +SKIP
        torch.Size([1, 1, 12, 12])
    """
    run_dir = Path(run_dir)
    task = run_task_name(run_dir)
    if task not in RUN_CONFIGS:
        raise UserError(f"{run_dir} is a '{task}' run, not an skt or skt-teacher run")
    config_cls, section = RUN_CONFIGS[task]
    cfg = open_run(run_dir, config_cls, task, overrides)
    model_cfg: CSRNetConfig = getattr(cfg, section)
    model = CSRNet(model_cfg.width_div, model_cfg.ceil_mode)
    export = run_dir / RUN_EXPORT
    if export.is_file():
        state = load_checkpoint_weights(export)  # DataError (one line) for a corrupt or truncated file
    else:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise DataError(f"{run_dir} has neither {RUN_EXPORT} nor a checkpoint")
        prefix = f"{section}."
        full = load_checkpoint_weights(ckpt)
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DataError(f"{run_dir}: weights do not match a 1/{model_cfg.width_div} CSRNet "
                        f"({str(err).splitlines()[0]})") from None
    return cfg, model.eval()
