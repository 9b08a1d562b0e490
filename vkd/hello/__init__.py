"""HeLlO: dataset distillation with a CLIP + LoRA label projector (Yu et al., arXiv 2408.08201).

Modules: ``config`` (typed configs), ``data`` (digits / ImageFolder), ``teacher`` (classifiers, teacher
artefacts), ``projector`` (CLIP + text-initialised head + peft LoRA), ``images`` (RDED selection, image
update), ``evaluate`` (students with online labels, storage arithmetic), ``distiller`` (engine tasks, export),
``commands`` (CLI entry points), ``demo`` (the ``vkd demo`` stage).
"""
