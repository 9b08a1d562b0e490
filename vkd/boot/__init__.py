"""BOOT: data-free distillation of a diffusion teacher into a one-step generator (Gu et al., arXiv 2306.05544).

Files: ``config`` (typed configs), ``teacher`` (the table of teacher kinds: diffusers UNet2DModel and text-to-image
pipelines, every prediction type), ``conditioning`` (prompt tables on a frozen text encoder, latent decoders),
``data`` (prompt files, BOOT's only data), ``schedule`` (noise schedules), ``student`` (the one-step generator),
``losses`` (bootstrap and boundary losses), ``distiller`` (the engine tasks), ``sample`` (sampling, DDIM, image
files), ``runs`` (reopen a run), ``evaluate`` (FID and speed of a run), ``commands`` (CLI adapters), ``demo`` (the
``vkd demo`` stage), ``pipeline_boot`` (the exported diffusers pipeline).
"""

from pathlib import Path

from vkd.method import Arg, MethodSpec, Ref, TaskSpec, VerbSpec

__all__ = ["METHOD"]

METHOD = MethodSpec(
    name="boot",
    title="BOOT: data-free one-step diffusion distillation",
    tasks=(
        TaskSpec(name="boot-teacher",
                 description="train the embedded DDPM teacher on scikit-learn digits (diffusers UNet2DModel)",
                 config=Ref("vkd.boot.config:BootTeacherConfig"), run=Ref("vkd.boot.commands:run_teacher"),
                 preset_dir="boot", default_preset="digits-teacher"),
        TaskSpec(name="boot-text-teacher",
                 description="train the embedded text-to-image DDPM on captioned digits (UNet2DConditionModel + "
                             "CLIPTextModel, StableDiffusionPipeline layout)",
                 config=Ref("vkd.boot.config:BootTextTeacherConfig"), run=Ref("vkd.boot.commands:run_text_teacher"),
                 preset_dir="boot", default_preset="digits-text-teacher"),
        TaskSpec(name="boot", description="BOOT: data-free one-step distillation of a diffusers teacher",
                 config=Ref("vkd.boot.config:BootConfig"), run=Ref("vkd.boot.commands:run_boot"),
                 evaluate=Ref("vkd.boot.commands:evaluate_boot"), preset_dir="boot", default_preset="digits"),
    ),
    demo=Ref("vkd.boot.demo:demo_stage"),
    verbs=(
        VerbSpec(
            name="sample", help="sample images from a distilled generator (BOOT)",
            args=(Arg("task", choices=["boot"], metavar="TASK", help="boot"),
                  Arg("--run", required=True, type=Path, help="BOOT run directory"),
                  Arg("--num", type=int, default=64, help="number of images"),
                  Arg("--out", type=Path, required=True, help="output directory for PNGs and a grid"),
                  Arg("--teacher-steps", type=int, default=None, metavar="K",
                      help="sample the teacher with K DDIM steps instead of the one-step student"),
                  Arg("--seed", type=int, default=0),
                  Arg("--batch-size", type=int, default=256)),
            run=Ref("vkd.boot.commands:sample_command"),
            examples="""examples:
  vkd sample boot --run runs/boot/digits --num 64 --out samples/
  vkd sample boot --run runs/boot/digits --num 64 --out samples/ --teacher-steps 50"""),
    ),
    fid_generators={"boot": Ref("vkd.boot.runs:run_image_batches")},
)
