"""toy: the engine's smoke test as a method (a tiny MLP student distilled from a fixed MLP teacher).

Its code is :mod:`vkd.engine.toy`; this package only declares it, as every method does.
"""

from vkd.method import MethodSpec, Ref, TaskSpec

__all__ = ["METHOD"]

METHOD = MethodSpec(
    name="toy",
    tasks=(
        TaskSpec(name="toy", description="tiny MLP student distilled from a fixed MLP teacher (engine smoke test)",
                 config=Ref("vkd.engine.toy:ToyConfig"), run=Ref("vkd.engine.toy:run"),
                 evaluate=Ref("vkd.engine.toy:evaluate"), preset_dir="toy"),
    ),
)
