"""SKT: efficient crowd counting via structured knowledge transfer (Liu et al., ACM MM 2020).

A CSRNet teacher is distilled into a 1/4-width CSRNet (6 % of the parameters) with intra-layer pattern
transfer (cosine between adapted student and teacher features) and inter-layer relation transfer (dense
FSP matrices between all pairs of tapped layers).

Parts: :mod:`~vkd.skt.config`, :mod:`~vkd.skt.models` (CSRNet family), :mod:`~vkd.skt.teacher` (teacher
kinds and the resolver), :mod:`~vkd.skt.density` (ground-truth maps), :mod:`~vkd.skt.layouts` (the table of
data set layouts: ShanghaiTech, UCF-QNRF, generic), :mod:`~vkd.skt.datasets` (readers, training and
evaluation sets), :mod:`~vkd.skt.crowds` (synthetic crowds), :mod:`~vkd.skt.losses` (the table of SKT loss
terms), :mod:`~vkd.skt.distiller` (training tasks), :mod:`~vkd.skt.runs` (reopen a run),
:mod:`~vkd.skt.evaluate` (MAE/RMSE, tiling, ``evaluate_run``), :mod:`~vkd.skt.checkpoints` (runs and the
community's checkpoint families as counters), :mod:`~vkd.skt.video` (streamed video frames),
:mod:`~vkd.skt.count` (``vkd count``), :mod:`~vkd.skt.export` (``vkd export skt``: ONNX,
TorchScript), :mod:`~vkd.skt.commands` (CLI adapters), :mod:`~vkd.skt.demo` (the
``vkd demo`` stage).
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
                 evaluate=Ref("vkd.skt.commands:evaluate"), preset_dir="skt", evaluates_weights=True),
        TaskSpec(name="skt", description="SKT: CSRNet -> 1/4-CSRNet with intra- and inter-layer knowledge transfer",
                 config=Ref("vkd.skt.config:SKTConfig"), run=Ref("vkd.skt.commands:run_skt"),
                 evaluate=Ref("vkd.skt.commands:evaluate"), preset_dir="skt", evaluates_weights=True),
    ),
    demo=Ref("vkd.skt.demo:demo_stage"),
    verbs=(
        VerbSpec(
            name="count",
            help="count people in images and videos with an SKT run or a released checkpoint (CSRNet-pytorch, "
                 "SKT, C³-Framework, DM-Count, Bayesian Loss)",
            args=(Arg("--run", type=Path, default=None, group="model", help="SKT (or skt-teacher) run directory"),
                  Arg("--weights", type=Path, default=None, group="model", metavar="FILE",
                      help="a checkpoint file: .pth/.pth.tar/.tar/.safetensors of a family in vkd.skt.checkpoints, "
                           "or an .onnx / TorchScript file of vkd export skt"),
                  Arg("inputs", nargs="+", help="image or video files, or directories of them"),
                  Arg("--out", type=Path, default=None,
                      help="where overlays and counts.csv go (default RUN/count or runs/count/<weights name>)"),
                  Arg("--every", type=int, default=1, metavar="N", help="videos: count every N-th frame"),
                  Arg("--max-side", type=int, default=0, metavar="PX",
                      help="downscale images and frames to this longer side first (default 0: as they are)"),
                  Arg("--mean", default=None, metavar="R,G,B",
                      help="input normalisation mean (default: the checkpoint family's)"),
                  Arg("--std", default=None, metavar="R,G,B",
                      help="input normalisation std (default: the checkpoint family's)"),
                  Arg("--log-para", type=float, default=None, metavar="X",
                      help="C³-Framework density scale (default 100)")),
            run=Ref("vkd.skt.commands:count_command"),
            examples="""examples:
  vkd count --run runs/skt/synthetic crowd.jpg
  vkd count --run runs/skt/synthetic images/ --out counts/
  vkd count --weights PartAmodel_best.pth.tar IMG_1.jpg          # CSRNet-pytorch, SKT, DM-Count, BL, C³
  vkd count --weights all_ep_93_mae_68.8_mse_116.9.pth --mean 0.452,0.447,0.432 --std 0.232,0.225,0.222 shb/
  vkd count --weights student.pth.tar street.mp4 --every 5 --max-side 1280
  vkd count --weights runs/skt/synthetic/export/model.onnx street.mp4      # ONNX Runtime (vkd export skt)"""),
        VerbSpec(
            name="export",
            help="export an SKT counter (a run or any checkpoint vkd count takes) to ONNX or TorchScript, with "
                 "dynamic batch/height/width and its normalisation and scale as metadata; checked against torch",
            args=(Arg("task", choices=("skt", "skt-teacher"), metavar="TASK",
                      help="skt or skt-teacher (either takes runs of both, as vkd eval does)"),
                  Arg("--run", type=Path, default=None, group="model", help="SKT (or skt-teacher) run directory"),
                  Arg("--weights", type=Path, default=None, group="model", metavar="FILE",
                      help="a checkpoint file of a family in vkd.skt.checkpoints, as for vkd count"),
                  Arg("--format", default="onnx", choices=("onnx", "torchscript"),
                      help="onnx (ONNX Runtime, default) or torchscript"),
                  Arg("--out", type=Path, default=None, metavar="FILE",
                      help="the file to write (default RUN/export/model.onnx or model.torchscript.pt; "
                           "runs/export/<weights name>/... for --weights; a directory gets that name inside)"),
                  Arg("--mean", default=None, metavar="R,G,B",
                      help="input normalisation mean recorded in the file (default: the checkpoint family's)"),
                  Arg("--std", default=None, metavar="R,G,B",
                      help="input normalisation std recorded in the file (default: the checkpoint family's)"),
                  Arg("--log-para", type=float, default=None, metavar="X",
                      help="C³-Framework density scale recorded in the file (default 100)")),
            run=Ref("vkd.skt.commands:export_command"),
            examples="""examples:
  vkd export skt --run runs/skt/synthetic                           # runs/skt/synthetic/export/model.onnx
  vkd export skt --run runs/skt/synthetic --format torchscript      # .../export/model.torchscript.pt
  vkd export skt --weights SHA_student.pth.tar --out student.onnx
  vkd count --weights runs/skt/synthetic/export/model.onnx crowd.jpg"""),
    ),
)
