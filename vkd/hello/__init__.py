"""HeLlO: dataset distillation with a CLIP + LoRA label projector (Yu et al., arXiv 2408.08201).

Modules: ``config`` (typed configs), ``data`` (digits in RAM; ImageFolder / file lists / tar shards streamed),
``model`` (classifiers by torchvision / timm name, weights), ``teacher`` (teacher artefacts, weak-teacher
selection), ``projector`` (CLIP + text-initialised head + peft LoRA), ``images`` (RDED selection, image update),
``evaluate`` (students with online labels, label sources, storage arithmetic), ``distiller`` (engine tasks,
export), ``commands`` (CLI adapters), ``demo`` (the ``vkd demo`` stage).
"""

from vkd.method import MethodSpec, Ref, TaskSpec

__all__ = ["METHOD"]

METHOD = MethodSpec(
    name="hello",
    title="HeLlO: dataset distillation with a CLIP + LoRA label projector",
    tasks=(
        TaskSpec(name="hello-teacher",
                 description="train the HeLlO soft-label teacher (small CNN, torchvision or timm) with weak-teacher snapshots",
                 config=Ref("vkd.hello.config:HelloTeacherConfig"), run=Ref("vkd.hello.commands:run_teacher"),
                 preset_dir="hello", default_preset="digits-teacher"),
        TaskSpec(name="hello", description="HeLlO: dataset distillation with a CLIP + LoRA label projector",
                 config=Ref("vkd.hello.config:HelloConfig"), run=Ref("vkd.hello.commands:run_hello"),
                 evaluate=Ref("vkd.hello.commands:evaluate_hello"), preset_dir="hello", default_preset="digits"),
    ),
    demo=Ref("vkd.hello.demo:demo_stage"),
)
