"""SKT: efficient crowd counting via structured knowledge transfer (Liu et al., ACM MM 2020).

A CSRNet teacher is distilled into a 1/4-width CSRNet (6 % of the parameters) with intra-layer pattern
transfer (cosine between adapted student and teacher features) and inter-layer relation transfer (dense
FSP matrices between all pairs of tapped layers).

Parts: :mod:`~vkd.skt.config`, :mod:`~vkd.skt.models` (CSRNet family), :mod:`~vkd.skt.teacher` (teacher
kinds and the resolver), :mod:`~vkd.skt.density` (ground-truth maps), :mod:`~vkd.skt.layouts` (the table of
data set layouts: ShanghaiTech, UCF-QNRF, generic), :mod:`~vkd.skt.datasets` (readers, training and
evaluation sets), :mod:`~vkd.skt.crowds` (synthetic crowds), :mod:`~vkd.skt.losses` (the table of SKT loss
terms), :mod:`~vkd.skt.distiller` (training tasks), :mod:`~vkd.skt.runs` (reopen a run),
:mod:`~vkd.skt.evaluate` (MAE/RMSE, tiling, ``evaluate_run``), :mod:`~vkd.skt.count` (``vkd count``),
:mod:`~vkd.skt.commands` (CLI adapters), :mod:`~vkd.skt.demo` (the ``vkd demo`` stage).
"""

from pathlib import Path

from vkd.method import Arg, MethodSpec, Ref, TaskSpec, VerbSpec

__all__ = ["METHOD"]

METHOD = MethodSpec(
    name="skt",
    title="SKT: crowd-counting distillation",
    tasks=(
        TaskSpec(name="skt-teacher",
                 description="train the CSRNet crowd-counting teacher (or, with model.width_div=4, the no-transfer "
                             "student)",
                 config=Ref("vkd.skt.config:SKTTeacherConfig"), run=Ref("vkd.skt.commands:run_teacher"),
                 evaluate=Ref("vkd.skt.commands:evaluate"), preset_dir="skt"),
        TaskSpec(name="skt", description="SKT: CSRNet -> 1/4-CSRNet with intra- and inter-layer knowledge transfer",
                 config=Ref("vkd.skt.config:SKTConfig"), run=Ref("vkd.skt.commands:run_skt"),
                 evaluate=Ref("vkd.skt.commands:evaluate"), preset_dir="skt"),
    ),
    demo=Ref("vkd.skt.demo:demo_stage"),
    verbs=(
        VerbSpec(
            name="count", help="count people in images with an SKT run (any image size, tiled)",
            args=(Arg("--run", required=True, type=Path, help="SKT (or skt-teacher) run directory"),
                  Arg("inputs", nargs="+", help="image files or directories"),
                  Arg("--out", type=Path, default=None, help="where overlays and counts.csv go")),
            run=Ref("vkd.skt.commands:count_command"),
            examples="""examples:
  vkd count --run runs/skt/synthetic crowd.jpg
  vkd count --run runs/skt/synthetic images/ --out counts/"""),
    ),
)
