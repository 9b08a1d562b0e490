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
import shutil
import sys
from pathlib import Path
from typing import Any

from vkd import __version__, registry
from vkd.config import dump_config, find_preset, load_config, repo_root
from vkd.demo import run_demo
from vkd.errors import NonFiniteError, TrainingInterrupted, UserError
from vkd.method import TaskSpec

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
    "fid": """examples:
  vkd fid --real data/test_images --fake runs/boot/digits --extractor digits --num-fake 2000
  vkd fid --real train_pngs/ --fake samples/ --metrics fid,kid,pr,is --weights pt_inception.pth \\
          --save-stats train_ref.npz --out a.json
  vkd fid --real train_ref.npz --fake samples/ --metrics fid,clip --prompts prompts.txt \\
          --clip-weights ViT-L-14.pt --out b.json
  vkd fid --compare a.json b.json""",
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
    """The ``vkd`` parser: tasks and method verbs come from the method declarations (:mod:`vkd.registry`)."""
    all_tasks = registry.tasks()
    eval_tasks = [name for name, t in all_tasks.items() if t.evaluate is not None]
    task_lines = "\n".join(f"  {name:<14} {t.description}" for name, t in all_tasks.items())
    parser = argparse.ArgumentParser(
        prog="vkd", formatter_class=_formatter,
        description="vkd: vision and diffusion knowledge distillation (BOOT, Feature 3DGS, HeLlO, SKT).",
        epilog=f"tasks:\n{task_lines}\n\nRun 'vkd <command> --help' for examples.")
    parser.add_argument("--version", action="version", version=f"vkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    def add(name: str, help_text: str, examples: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=examples or EXAMPLES.get(name),
                              formatter_class=_formatter)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE|PRESET",
                       help="YAML file, or the name of a preset in configs/<task>/ (default: the task's default)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")

    p = add("distill", "train a task (teacher or distillation) and write a run directory")
    p.add_argument("task", choices=list(all_tasks), metavar="TASK", help="one of: " + ", ".join(all_tasks))
    add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the latest checkpoint of the run (or from PATH)")
    p.add_argument("--overwrite", action="store_true", help="start fresh in a run directory that has checkpoints")
    p.add_argument("--detect-anomaly", action="store_true", help="torch autograd anomaly detection (slow)")

    p = add("eval", "evaluate a finished run")
    p.add_argument("task", choices=eval_tasks, metavar="TASK", help="one of: " + ", ".join(eval_tasks))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="run directory (holds config.yaml)")
    source.add_argument("--weights", type=Path, metavar="FILE",
                        help="a released checkpoint file instead of a run (skt, skt-teacher), on --set data...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the run directory)")

    for verb in registry.verbs().values():  # vkd sample / render / count: declared by their methods
        p = add(verb.name, verb.help, verb.examples)
        groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
        for arg in verb.args:
            options = dict(arg.options)
            group = options.pop("group", None)
            if group and group not in groups:
                groups[group] = p.add_mutually_exclusive_group()
            (groups[group] if group else p).add_argument(*arg.flags, **options)
        p.set_defaults(verb=verb)

    p = add("fid", "generative metrics (FID, KID, precision/recall, IS, CLIP score, sFID) of a fake set against "
                   "a real set or reference statistics")
    p.add_argument("--real", default=None, metavar="DIR|NPZ", help="real image folder or reference statistics .npz")
    p.add_argument("--fake", default=None, metavar="DIR|NPZ|RUN",
                   help="generated image folder, statistics .npz, or a run folder (e.g. BOOT) to sample")
    p.add_argument("--metrics", default="fid", metavar="LIST",
                   help="comma-separated: fid,kid,pr,is,clip,sfid (default: fid)")
    p.add_argument("--extractor", default="inception", metavar="NAME|PATH",
                   help="inception (standard, default), dinov2, clip, digits (embedded, not Inception) or a "
                        "TorchScript / vkd classifier path")
    p.add_argument("--weights", "--inception-weights", dest="weights", default=None, metavar="PATH",
                   help="the extractor's local weights: Inception .pth, DINOv2 Hugging Face folder, OpenAI CLIP .pt")
    p.add_argument("--num-fake", type=int, default=None, metavar="N",
                   help="fake images: samples drawn from a run (default 2000) or the first N files of a folder")
    p.add_argument("--num-real", type=int, default=None, metavar="N", help="the first N real files (default: all)")
    p.add_argument("--num", type=int, default=None, metavar="N", help="deprecated: the same as --num-fake")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of run folders (default 0)")
    p.add_argument("--metric-seed", type=int, default=2020,
                   help="seed of the KID subsets and the IS shuffle (default 2020, torch-fidelity's)")
    p.add_argument("--kid-subsets", type=int, default=100, metavar="N", help="KID subsets (default 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, metavar="N", help="KID subset size (default 1000)")
    p.add_argument("--pr-k", type=int, default=3, metavar="K", help="precision/recall neighbourhood (default 3)")
    p.add_argument("--is-splits", type=int, default=10, metavar="N", help="Inception Score splits (default 10)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="CLIP score prompts: one line per image (name order) or JSON {file name: prompt}")
    p.add_argument("--clip-model", default="ViT-L-14-quickgelu", metavar="NAME",
                   help="open_clip model of the CLIP score (default ViT-L-14-quickgelu, for OpenAI's ViT-L-14.pt), "
                        "a model-config .json, or local-dir:DIR")
    p.add_argument("--clip-weights", default=None, metavar="PATH", help="its local weights file")
    p.add_argument("--save-stats", default=None, metavar="NPZ",
                   help="write the real-set statistics (and features when KID/PR need them) to this .npz")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader workers reading image folders")
    p.add_argument("--out", default=None, metavar="JSON", help="write the result and its protocol as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                   help="compare two --out results; refused unless their protocols match")

    stages = [spec.name for spec in registry.demo_methods()]
    p = add("demo", f"run the {len(stages)} distillations on the embedded defaults and write a report")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--quick", action="store_true", help="fewer steps: minutes instead of a quarter hour")
    p.add_argument("--force", action="store_true", help="redo stages that already finished")
    p.add_argument("--only", action="append", default=None, metavar="STAGE",
                   help=f"run only this stage ({', '.join(stages)}); repeatable")

    p = add("config", "inspect task configs")
    csub = p.add_subparsers(dest="config_command", metavar="<action>")
    show = csub.add_parser("show", help="print the fully resolved config of a task", formatter_class=_formatter,
                           epilog=EXAMPLES["config"])
    show.add_argument("task", choices=list(all_tasks), metavar="TASK", help="one of: " + ", ".join(all_tasks))
    add_config_args(show)
    csub.add_parser("list", help="list tasks and their presets")
    return parser


def _load_task_config(task_name: str, config: str | None, overrides: list[str]) -> tuple[TaskSpec, Any]:
    entry = registry.get_task(task_name)
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
        ckpts = cfg.run_dir() / "checkpoints"
        if ckpts.is_dir():
            shutil.rmtree(ckpts)
    summary = entry.run(cfg, args.resume)
    print(f"run directory: {cfg.run_dir()}")
    _print_table({k: v for k, v in summary.items() if k in ("status", "steps", "final", "eval", "wall_time_s")})
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    entry = registry.get_task(args.task)
    if entry.evaluate is None:
        raise UserError(f"'vkd eval {args.task}' is not implemented yet")
    if args.weights is not None:
        if not entry.evaluates_weights:
            takes = [t.name for t in registry.tasks().values() if t.evaluates_weights]
            raise UserError(f"'vkd eval {args.task}' evaluates run directories (--run); --weights FILE is for: "
                            f"{', '.join(takes)}")
        if not args.weights.is_file():
            raise UserError(f"--weights {args.weights}: no such file")
        source = args.weights
    else:
        if not (args.run / "config.yaml").is_file():
            raise UserError(f"{args.run} is not a run directory (no config.yaml)")
        source = args.run
    metrics = entry.evaluate(source, args.overrides, args.out)
    _print_table(metrics)
    return 0


def _cmd_verb(args: argparse.Namespace) -> int:
    """A method's own subcommand (``vkd sample``, ``render``, ``count``): its declared adapter does the work."""
    _print_table(args.verb.run(args))
    return 0


def _cmd_fid(args: argparse.Namespace) -> int:
    # here, not at the top: it imports torch (`vkd --help` must not)
    from vkd.metrics.fid_command import compare_command, fid_command

    if args.compare:
        if args.real or args.fake:
            raise UserError("--compare A.json B.json takes no --real / --fake")
        print(compare_command(*args.compare)["line"])
        return 0
    if not args.real or not args.fake:
        raise UserError("vkd fid needs --real and --fake (or --compare A.json B.json)")
    num_fake = args.num_fake
    if args.num is not None:
        if num_fake is not None:
            raise UserError("--num is the deprecated name of --num-fake: give only --num-fake")
        # kept so that existing commands run; it no longer truncates the real set as it once did
        print("vkd: warning: --num is deprecated, use --num-fake (the real set is not truncated; see --num-real)",
              file=sys.stderr)
        num_fake = args.num
    result = fid_command(args.real, args.fake, args.extractor, args.weights, args.batch_size, num_fake, args.out,
                         args.device, args.seed, args.save_stats, registry.fid_generators(),
                         metrics=args.metrics, num_real=args.num_real, kid_subsets=args.kid_subsets,
                         kid_subset_size=args.kid_subset_size, pr_k=args.pr_k, is_splits=args.is_splits,
                         metric_seed=args.metric_seed, prompts=args.prompts, clip_model=args.clip_model,
                         clip_weights=args.clip_weights, num_workers=args.workers)
    print(result["line"])
    for side in ("real", "fake"):  # unreadable images are skipped, never silently
        if result.get(f"skipped_{side}"):
            files = "; ".join(result.get(f"skipped_{side}_files", [])[:3])
            print(f"vkd: warning: skipped {result[f'skipped_{side}']} unreadable {side} image(s): {files}",
                  file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return int(run_demo(args.out, quick=args.quick, force=args.force, only=args.only))


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "show":
        _, cfg = _load_task_config(args.task, args.config, args.overrides)
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.config_command == "list":
        for name, task in registry.tasks().items():
            presets = sorted(p.stem for p in (repo_root() / "configs" / task.preset_dir).glob("*.yaml"))
            status = ", ".join(presets) if presets else "(defaults only)"
            print(f"{name:<14} {task.description}\n{'':<14} presets: {status}")
        return 0
    raise UserError("usage: vkd config {show,list}")


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
        code = COMMANDS.get(args.command, _cmd_verb)(args)
        if "torch" in sys.modules:  # `vkd --help` and config commands never import it
            from vkd.engine.runs import close_process_group

            close_process_group()
        return code
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
