"""The ``vkd`` command line: parses, loads the config, calls one library function per subcommand.

User mistakes (``vkd.errors.UserError``) print one line ``vkd: error: ...`` and exit with code 2, and so do
storage failures (disk full, read-only file system, I/O errors); non-finite training exits with 3; an
interrupted run (after saving a checkpoint) exits with 130.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vkd import __version__
from vkd.errors import NonFiniteError, TrainingInterrupted, UserError

EXAMPLES = {
    "distill": """examples:
  vkd distill toy                                   # engine smoke test, seconds on a CPU
  vkd distill boot-teacher --config digits-teacher  # preset configs/boot/digits-teacher.yaml
  vkd distill boot --config digits --set train.steps=2000 --set run.name=long
  vkd distill skt --config runs/skt/default/config.yaml --resume   # continue a run
  torchrun --nproc_per_node 2 -m vkd.cli distill toy                # two processes""",
    "eval": """examples:
  vkd eval toy --run runs/toy/default
  vkd eval skt --run runs/skt/synthetic --out runs/skt/synthetic/eval""",
    "sample": """examples:
  vkd sample boot --run runs/boot/digits --num 64 --out samples/
  vkd sample boot --run runs/boot/digits --num 64 --out samples/ --teacher-steps 50""",
    "render": """examples:
  vkd render --run runs/feature3dgs/synthetic                       # test views: RGB, depth, PCA features
  vkd render --run runs/feature3dgs/synthetic --views orbit --frames 60 --format mp4
  vkd render --run runs/feature3dgs/synthetic --query "red sphere" --extract""",
    "count": """examples:
  vkd count --run runs/skt/synthetic crowd.jpg
  vkd count --run runs/skt/synthetic images/ --out counts/""",
    "fid": """examples:
  vkd fid --real data/test_images --fake runs/boot/digits --extractor digits
  vkd fid --real cifar10_train.npz --fake samples/ --extractor inception --inception-weights pt_inception.pth""",
    "demo": """examples:
  vkd demo                       # all four methods on the embedded defaults, report in runs/demo/
  vkd demo --quick --out /tmp/demo""",
    "config": """examples:
  vkd config list
  vkd config show toy
  vkd config show boot --config digits --set train.steps=10""",
}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    from vkd.registry import DESCRIPTIONS, DISTILL_TASKS, EVAL_TASKS

    task_lines = "\n".join(f"  {name:<14} {DESCRIPTIONS.get(name, '')}" for name in DISTILL_TASKS)
    parser = argparse.ArgumentParser(
        prog="vkd", formatter_class=_formatter,
        description="vkd: vision and diffusion knowledge distillation (BOOT, Feature 3DGS, HeLlO, SKT).",
        epilog=f"tasks:\n{task_lines}\n\nRun 'vkd <command> --help' for examples.")
    parser.add_argument("--version", action="version", version=f"vkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                              formatter_class=_formatter)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE|PRESET",
                       help="YAML file, or the name of a preset in configs/<task>/ (default: the task's default)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")

    p = add("distill", "train a task (teacher or distillation) and write a run directory")
    p.add_argument("task", choices=list(DISTILL_TASKS), metavar="TASK", help="one of: " + ", ".join(DISTILL_TASKS))
    add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the latest checkpoint of the run (or from PATH)")
    p.add_argument("--overwrite", action="store_true", help="start fresh in a run directory that has checkpoints")
    p.add_argument("--detect-anomaly", action="store_true", help="torch autograd anomaly detection (slow)")

    p = add("eval", "evaluate a finished run")
    p.add_argument("task", choices=list(EVAL_TASKS), metavar="TASK", help="one of: " + ", ".join(EVAL_TASKS))
    p.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the run directory)")

    p = add("sample", "sample images from a distilled generator (BOOT)")
    p.add_argument("task", choices=["boot"], metavar="TASK", help="boot")
    p.add_argument("--run", required=True, type=Path, help="BOOT run directory")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--out", type=Path, required=True, help="output directory for PNGs and a grid")
    p.add_argument("--teacher-steps", type=int, default=None, metavar="K",
                   help="sample the teacher with K DDIM steps instead of the one-step student")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)

    p = add("render", "render a Feature 3DGS run: RGB, depth, PCA features, text queries")
    p.add_argument("--run", required=True, type=Path, help="Feature 3DGS run directory")
    p.add_argument("--views", choices=["test", "train", "orbit", "spiral"], default="test")
    p.add_argument("--frames", type=int, default=60, help="frames of an orbit/spiral path")
    p.add_argument("--query", default=None, help="text query, e.g. 'red sphere'")
    edit = p.add_mutually_exclusive_group()
    edit.add_argument("--extract", dest="edit", action="store_const", const="extract",
                      help="keep only the Gaussians that match --query")
    edit.add_argument("--delete", dest="edit", action="store_const", const="delete",
                      help="remove the Gaussians that match --query")
    p.add_argument("--threshold", type=float, default=None, help="relevancy threshold for --extract/--delete")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN/renders/...)")
    p.add_argument("--format", dest="fmt", choices=["mp4", "gif", "png"], default="mp4", help="video format")

    p = add("count", "count people in images with an SKT run (any image size, tiled)")
    p.add_argument("--run", required=True, type=Path, help="SKT (or skt-teacher) run directory")
    p.add_argument("inputs", nargs="+", help="image files or directories")
    p.add_argument("--out", type=Path, default=None, help="where overlays and counts.csv go")

    p = add("fid", "Fréchet distance between two image sets (or reference statistics)")
    p.add_argument("--real", required=True, help="image directory or reference statistics .npz")
    p.add_argument("--fake", required=True, help="image directory, .npz, or a BOOT run directory")
    p.add_argument("--extractor", default="inception",
                   help="'inception' (standard FID), 'digits' (embedded, not Inception) or a model path")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help="local Inception weights (offline)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num", type=int, default=None, help="use at most N images of each set")
    p.add_argument("--out", default=None, metavar="JSON", help="write the result as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")

    p = add("demo", "run all four distillations on the embedded defaults and write a report")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--quick", action="store_true", help="fewer steps: minutes instead of a quarter hour")
    p.add_argument("--force", action="store_true", help="redo stages that already finished")
    p.add_argument("--only", action="append", default=None, metavar="STAGE",
                   help="run only this stage (boot, feature3dgs, hello, skt); repeatable")

    p = add("config", "inspect task configs")
    csub = p.add_subparsers(dest="config_command", metavar="<action>")
    show = csub.add_parser("show", help="print the fully resolved config of a task", formatter_class=_formatter,
                           epilog=EXAMPLES["config"])
    show.add_argument("task", choices=list(DISTILL_TASKS), metavar="TASK", help="one of: " + ", ".join(DISTILL_TASKS))
    add_config_args(show)
    csub.add_parser("list", help="list tasks and their presets")
    return parser


def _load_task_config(task_name: str, config: str | None, overrides: list[str]) -> tuple[Any, Any]:
    from vkd.config import find_preset, load_config
    from vkd.registry import get_task

    entry = get_task(task_name)
    name = config or entry.default_preset
    path = find_preset(entry.preset_dir, name) if name else None
    cfg = load_config(entry.config_cls, path, overrides, task=task_name)
    return entry, cfg


def _print_table(metrics: dict[str, Any]) -> None:
    width = max((len(str(k)) for k in metrics), default=0)
    for key, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        print(f"{key:<{width}}  {value}")


def _cmd_distill(args: argparse.Namespace) -> int:
    entry, cfg = _load_task_config(args.task, args.config, args.overrides)
    if args.detect_anomaly:
        cfg.train.detect_anomaly = True
    if args.overwrite:
        import shutil

        ckpts = cfg.run_dir() / "checkpoints"
        if ckpts.is_dir():
            shutil.rmtree(ckpts)
    summary = entry.run(cfg, args.resume)
    print(f"run directory: {cfg.run_dir()}")
    _print_table({k: v for k, v in summary.items() if k in ("status", "steps", "final", "eval", "wall_time_s")})
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vkd.registry import get_task

    if not (args.run / "config.yaml").is_file():
        raise UserError(f"{args.run} is not a run directory (no config.yaml)")
    entry = get_task(args.task)
    if entry.evaluate is None:
        raise UserError(f"'vkd eval {args.task}' is not implemented yet")
    metrics = entry.evaluate(args.run, args.overrides, args.out)
    _print_table(metrics)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from vkd.registry import resolve

    sample = resolve("vkd.boot.commands:sample", "'vkd sample boot'")
    _check_run(args.run)
    if args.num < 1:
        raise UserError("--num must be at least 1")
    result = sample(args.run, args.num, args.out, args.teacher_steps, args.seed, args.batch_size)
    _print_table(result)
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from vkd.registry import resolve

    render = resolve("vkd.feature3dgs.commands:render", "'vkd render'")
    _check_run(args.run)
    if args.edit and not args.query:
        raise UserError("--extract/--delete need --query")
    result = render(args.run, args.views, args.frames, args.query, args.edit, args.threshold, args.out, args.fmt)
    _print_table(result)
    return 0


def _cmd_count(args: argparse.Namespace) -> int:
    from vkd.registry import resolve

    count = resolve("vkd.skt.commands:count", "'vkd count'")
    _check_run(args.run)
    result = count(args.run, args.inputs, args.out)
    _print_table(result)
    return 0


def _cmd_fid(args: argparse.Namespace) -> int:
    from vkd.registry import resolve

    fid_command = resolve("vkd.metrics.fid:fid_command", "'vkd fid'")
    result = fid_command(args.real, args.fake, args.extractor, args.inception_weights, args.batch_size, args.num,
                         args.out, args.device)
    print(f"FID ({result.get('extractor', args.extractor)}): {result['fid']:.4f}")
    for side in ("real", "fake"):  # unreadable images are skipped, never silently
        if result.get(f"skipped_{side}"):
            files = "; ".join(result.get(f"skipped_{side}_files", [])[:3])
            print(f"vkd: warning: skipped {result[f'skipped_{side}']} unreadable {side} image(s): {files}",
                  file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vkd.registry import resolve

    run_demo = resolve("vkd.demo:run_demo", "'vkd demo'")
    return int(run_demo(args.out, quick=args.quick, force=args.force, only=args.only))


def _cmd_config(args: argparse.Namespace) -> int:
    from vkd.config import dump_config, repo_root
    from vkd.registry import DESCRIPTIONS, DISTILL_TASKS

    if args.config_command == "show":
        _, cfg = _load_task_config(args.task, args.config, args.overrides)
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.config_command == "list":
        from vkd.registry import get_task

        for name in DISTILL_TASKS:
            try:
                preset_dir = get_task(name).preset_dir
                presets = sorted(p.stem for p in (repo_root() / "configs" / preset_dir).glob("*.yaml"))
                status = ", ".join(presets) if presets else "(defaults only)"
            except UserError:
                status = "(not implemented yet)"
            print(f"{name:<14} {DESCRIPTIONS.get(name, '')}\n{'':<14} presets: {status}")
        return 0
    raise UserError("usage: vkd config {show,list}")


def _check_run(run: Path) -> None:
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")


# disk full, quota exceeded, file too large, read-only file system, I/O error, permission denied
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES}


def _message(err: BaseException) -> str:
    """The error's message. A DataLoader worker re-raises an error with the worker's traceback in the message
    ("Caught DataError in DataLoader worker process 0. Original Traceback ... vkd.errors.DataError: <message>"):
    only the original one-line message is kept."""
    text = str(err)
    if "Original Traceback" in text:
        marker = f"{type(err).__module__}.{type(err).__name__}: "
        last = text.strip().splitlines()[-1]
        return last.split(marker, 1)[1] if marker in last else last
    return text


COMMANDS = {
    "distill": _cmd_distill,
    "eval": _cmd_eval,
    "sample": _cmd_sample,
    "render": _cmd_render,
    "count": _cmd_count,
    "fid": _cmd_fid,
    "demo": _cmd_demo,
    "config": _cmd_config,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # vkd's own progress at INFO; other libraries' INFO chatter (open_clip logs every model load on the root
    # logger) only with --verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("vkd").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"vkd: error: {_message(err)}", file=sys.stderr)
        return err.exit_code
    except NonFiniteError as err:
        print(f"vkd: error: {err}", file=sys.stderr)
        return err.exit_code
    except TrainingInterrupted as err:
        print(f"vkd: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("vkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        if err.errno not in _STORAGE_ERRNOS:
            raise
        # the machine's storage failed, not vkd: one line (a checkpoint write reports its own, more precise error)
        where = f": {err.filename}" if err.filename else ""
        print(f"vkd: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
