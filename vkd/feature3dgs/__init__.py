"""Feature 3DGS: distil dense CLIP features into a 3D Gaussian feature field (Zhou et al., CVPR 2024).

Parts: ``data`` (scene formats table: COLMAP, transforms.json; ``prepare_scene``), ``synthetic`` (embedded scene
generator), ``teacher`` (teacher kinds table, ``prepare_teacher``), ``maskclip`` (dense CLIP features),
``feature_cache`` (fp16 memory-mapped teacher maps), ``feature_files`` (per-image feature files:
``teacher.kind=files``, ``vkd features``), ``model`` (Gaussians + 1x1 decoder), ``losses``, ``distiller``
(the training task), ``lift`` (training-free lifting onto a trained 3DGS scene: ``vkd lift``), ``runs`` (reopen a
run), ``evaluate``, ``query`` (text queries, editing), ``render``, ``export``, ``commands`` (CLI adapters), ``demo``.
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
                  Arg("--query", default=None, group="prompt", help="text query, e.g. 'red sphere'"),
                  Arg("--point", nargs=3, metavar=("VIEW", "X", "Y"), default=None, group="prompt",
                      help="point prompt: the feature rendered at pixel X Y (column, row) of VIEW (a camera name "
                           "or an index into the scene's cameras, sorted by name); for teachers without text"),
                  Arg("--extract", dest="edit", action="store_const", const="extract", group="edit",
                      help="keep only the Gaussians that match --query"),
                  Arg("--delete", dest="edit", action="store_const", const="delete", group="edit",
                      help="remove the Gaussians that match --query"),
                  Arg("--threshold", type=float, default=None,
                      help="relevancy threshold for --extract/--delete (a cosine for --point, default 0.9)"),
                  Arg("--out", type=Path, default=None, help="output directory (default: RUN/renders/...)"),
                  Arg("--format", dest="fmt", choices=["mp4", "gif", "png"], default="mp4", help="video format")),
            run=Ref("vkd.feature3dgs.commands:render_command"),
            examples="""examples:
  vkd render --run runs/feature3dgs/synthetic                       # test views: RGB, depth, PCA features
  vkd render --run runs/feature3dgs/synthetic --views orbit --frames 60 --format mp4
  vkd render --run runs/feature3dgs/synthetic --query "red sphere" --extract
  vkd render --run runs/feature3dgs/synthetic --point 0 12 30 --extract --threshold 0.9"""),
        VerbSpec(
            name="features", help="write a teacher's per-image feature maps as files (<stem>.npy [D, h, w] fp16)",
            args=(Arg("--scene", required=True, help="scene directory (COLMAP, transforms.json) or 'synthetic'"),
                  Arg("--teacher", required=True, metavar="KIND",
                      help="teacher.kind: maskclip, tiny_clip, callable (with --set teacher.target=...), files"),
                  Arg("--config", default=None, metavar="FILE|PRESET",
                      help="YAML file or feature3dgs preset (default: the config defaults)"),
                  Arg("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set teacher.input_size=448 (repeatable)"),
                  Arg("--out", required=True, type=Path, help="output directory of the feature files")),
            run=Ref("vkd.feature3dgs.commands:features_command"),
            examples="""examples:
  vkd features --scene /data/garden --teacher maskclip --set teacher.input_size=448 --out /data/garden/clip
  vkd features --scene /data/garden --teacher callable --set teacher.target=my_pkg.sam:dense --out feats/
  vkd distill feature3dgs --config colmap_vitb16 --set data.path=/data/garden \\
      --set teacher.kind=files --set teacher.features_dir=/data/garden/clip --set teacher.text_encoder=open_clip"""),
        VerbSpec(
            name="lift", help="training-free feature field: average a teacher's maps onto a trained 3DGS scene",
            args=(Arg("--scene", required=True, help="scene directory (COLMAP, transforms.json) or 'synthetic'"),
                  Arg("--ply", required=True, help="the trained 3DGS scene: a standard 3DGS PLY (model.init_ply)"),
                  Arg("--features", default=None, metavar="DIR", group="source",
                      help="per-image feature files (teacher.kind=files; <stem>.npy/.pt/.safetensors)"),
                  Arg("--teacher", default=None, metavar="KIND", group="source",
                      help="or a built-in teacher: maskclip, tiny_clip, callable (with --set teacher.target=...)"),
                  Arg("--config", default=None, metavar="FILE|PRESET",
                      help="YAML file or feature3dgs preset (default: the config defaults)"),
                  Arg("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set model.render_dim=64 (repeatable)"),
                  Arg("--out", required=True, type=Path, help="run directory to write (rerun to resume)")),
            run=Ref("vkd.feature3dgs.commands:lift_command"),
            examples="""examples:
  vkd lift --scene /data/garden --ply /models/garden/point_cloud/iteration_30000/point_cloud.ply \\
      --features /data/garden/clip --set teacher.text_encoder=open_clip --out runs/lift/garden
  vkd lift --scene synthetic --ply runs/feature3dgs/synthetic/export/point_cloud.ply --teacher auto \\
      --config synthetic --out runs/lift/synthetic
  vkd eval feature3dgs --run runs/lift/synthetic && vkd render --run runs/lift/synthetic --query "red sphere" --extract"""),
    ),
)
