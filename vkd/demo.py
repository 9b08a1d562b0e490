"""``vkd demo``: the four distillations end to end on the embedded defaults, with a visual report.

Each stage writes into ``<out>/<stage>/<full|quick>/`` and records its finished result in ``stage.json``
there; a rerun reuses finished stages, and a stage interrupted half-way resumes its runs from their last
checkpoints (``--force`` deletes the stage's directory and starts it over). A failing stage is reported in the report and the
exit code, and does not stop the other stages.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vkd import registry
from vkd.errors import TrainingInterrupted, UserError
from vkd.report import Section, montage, write_report

__all__ = ["run_demo", "STAGES"]

log = logging.getLogger("vkd.demo")


# stage name -> (title, stage function), from the methods that declare a demo stage (vkd.registry)
STAGES: dict[str, tuple[str, Callable[[Path, bool], Section]]] = {
    spec.name: (spec.title, spec.demo) for spec in registry.demo_methods() if spec.demo is not None}


def _section_to_json(sec: Section) -> dict[str, Any]:
    data = asdict(sec)
    data["images"] = [[c, str(p)] for c, p in sec.images]
    data["links"] = [[c, str(p)] for c, p in sec.links]
    data["headline"] = [list(row) for row in sec.headline]
    return data


def _section_from_json(data: dict[str, Any]) -> Section:
    sec = Section(**{k: v for k, v in data.items() if k not in ("images", "links", "headline")})
    sec.images = [(c, Path(p)) for c, p in data.get("images", [])]
    sec.links = [(c, Path(p)) for c, p in data.get("links", [])]
    sec.headline = [tuple(row) for row in data.get("headline", [])]
    return sec


def run_demo(out: Path, quick: bool = False, force: bool = False, only: list[str] | None = None) -> int:
    """Run the stages, write ``report.html`` and ``report.md`` into ``out``; return the exit code."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = only or list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UserError(f"unknown demo stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    mode = "quick" if quick else "full"
    sections: list[Section] = []
    failed = []
    for name in STAGES:
        title, fn = STAGES[name]
        stage_dir = out / name / mode
        marker = stage_dir / "stage.json"
        if name not in names:
            if marker.is_file():
                sections.append(_section_from_json(json.loads(marker.read_text())))
            continue
        if marker.is_file() and not force:
            print(f"[demo] {name}: reusing finished stage ({marker})", flush=True)
            sections.append(_section_from_json(json.loads(marker.read_text())))
            continue
        print(f"[demo] {name}: {title} ({mode})", flush=True)
        start = time.time()
        if force and stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        try:
            sec = fn(stage_dir, quick)
            sec.title = title
            sec.text.append(f"Stage wall time: {time.time() - start:.0f} s on this machine ({mode} mode).")
            tmp = marker.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(_section_to_json(sec), indent=2, default=str))
            tmp.replace(marker)  # atomic: a stage is either finished or not
        except (TrainingInterrupted, KeyboardInterrupt):
            raise  # the user stopped the demo: the runs keep their checkpoints, a rerun resumes them
        except Exception as err:  # one stage's failure must not hide the others' results
            detail = traceback.format_exc()
            (stage_dir / "error.log").write_text(detail)
            log.error("demo stage %s failed: %s (traceback in %s)", name, err, stage_dir / "error.log")
            sec = Section(title=title, status="failed", error=f"{type(err).__name__}: {err}")
            failed.append(name)
        print(f"[demo] {name}: {sec.status} in {time.time() - start:.0f} s", flush=True)
        sections.append(sec)
    intro = [
        "Every number below was produced by this run of `vkd demo` on this machine, on vkd's embedded defaults "
        "(scikit-learn digits, a synthetic 3D scene, synthetic crowds). The papers' anchor numbers are on "
        "different datasets and models (ImageNet, Replica, ShanghaiTech) and are shown only for orientation.",
    ]
    # one picture per module at the top: the first image of each finished stage
    panels = [(sec.title.split(":")[0], sec.images[0][1]) for sec in sections if sec.status == "ok" and sec.images]
    overview = montage(out / "overview.png", panels)
    md, html_path = write_report(out, "vkd demo report", intro, sections,
                                 [("One result per module", overview)] if overview else None)
    print(f"[demo] report: {html_path} and {md}", flush=True)
    if failed:
        print(f"[demo] failed stages: {', '.join(failed)}", flush=True)
        return 1
    return 0
