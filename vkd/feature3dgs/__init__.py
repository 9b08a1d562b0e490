"""Feature 3DGS: distil dense CLIP features into a 3D Gaussian feature field (Zhou et al., CVPR 2024).

Parts: ``data`` (scene formats table: COLMAP, transforms.json; ``prepare_scene``), ``synthetic`` (embedded scene
generator), ``teacher`` (teacher kinds table, ``prepare_teacher``), ``maskclip`` (dense CLIP features),
``feature_cache`` (fp16 memory-mapped teacher maps), ``model`` (Gaussians + 1x1 decoder), ``losses``, ``distiller``
(the training task), ``runs`` (reopen a run), ``evaluate``, ``query`` (text queries, editing), ``render``,
``export``, ``commands`` (CLI adapters), ``demo``.
"""

from pathlib import Path

from vkd.method import Arg, MethodSpec, Ref, TaskSpec, VerbSpec

__all__ = ["METHOD"]

METHOD = MethodSpec(
    name="feature3dgs",
    title="Feature 3DGS: CLIP feature field",
    tasks=(
        TaskSpec(name="feature3dgs",
                 description="Feature 3DGS: distil dense CLIP features into a 3D Gaussian feature field",
                 config=Ref("vkd.feature3dgs.config:Feature3DGSConfig"), run=Ref("vkd.feature3dgs.commands:run"),
                 evaluate=Ref("vkd.feature3dgs.commands:evaluate"), preset_dir="feature3dgs",
                 default_preset="synthetic"),
    ),
    demo=Ref("vkd.feature3dgs.demo:demo_stage"),
    verbs=(
        VerbSpec(
            name="render", help="render a Feature 3DGS run: RGB, depth, PCA features, text queries",
            args=(Arg("--run", required=True, type=Path, help="Feature 3DGS run directory"),
                  Arg("--views", choices=["test", "train", "orbit", "spiral"], default="test"),
                  Arg("--frames", type=int, default=60, help="frames of an orbit/spiral path"),
                  Arg("--query", default=None, help="text query, e.g. 'red sphere'"),
                  Arg("--extract", dest="edit", action="store_const", const="extract", group="edit",
                      help="keep only the Gaussians that match --query"),
                  Arg("--delete", dest="edit", action="store_const", const="delete", group="edit",
                      help="remove the Gaussians that match --query"),
                  Arg("--threshold", type=float, default=None, help="relevancy threshold for --extract/--delete"),
                  Arg("--out", type=Path, default=None, help="output directory (default: RUN/renders/...)"),
                  Arg("--format", dest="fmt", choices=["mp4", "gif", "png"], default="mp4", help="video format")),
            run=Ref("vkd.feature3dgs.commands:render_command"),
            examples="""examples:
  vkd render --run runs/feature3dgs/synthetic                       # test views: RGB, depth, PCA features
  vkd render --run runs/feature3dgs/synthetic --views orbit --frames 60 --format mp4
  vkd render --run runs/feature3dgs/synthetic --query "red sphere" --extract"""),
    ),
)
