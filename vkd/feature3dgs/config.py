"""Typed configuration of the Feature 3DGS task (``vkd distill feature3dgs``).

Defaults follow the Feature 3DGS reference schedule (spec §4–§5) where it makes sense on any machine; the embedded
synthetic preset (``configs/feature3dgs/synthetic.yaml``) shortens it for CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from vkd.config import TaskConfig, TrainConfig, check_nonnegative, check_positive
from vkd.errors import ConfigError
from vkd.feature3dgs.data import SCENE_FORMATS
from vkd.models.tiny_clip import TinyClipConfig

__all__ = [
    "SyntheticConfig",
    "DataConfig",
    "TinyTeacherConfig",
    "TeacherConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "DensifyConfig",
    "EvalConfig",
    "QueryConfig",
    "ComputeConfig",
    "LiftConfig",
    "Feature3DGSTrainConfig",
    "Feature3DGSConfig",
    "cache_root",
]

SceneFormatName = Literal[("auto", *SCENE_FORMATS)]  # type: ignore[valid-type]  # vkd.feature3dgs.data.SCENE_FORMATS


@dataclass
class SyntheticConfig:
    """The embedded scene generator (:mod:`vkd.feature3dgs.synthetic`)."""

    num_views: int = 48  # posed views on an orbit; every ``data.test_every``-th is held out
    resolution: int = 64  # square image side in pixels
    supersample: int = 3  # rays per pixel side (anti-aliasing of the analytic renders)
    num_points: int = 4000  # sparse "SfM" point cloud: hits of rays through random training pixels
    seed: int = 0
    out_dir: str | None = None  # None: <run.output_dir>/feature3dgs/_scenes/synthetic-<hash>

    def __post_init__(self) -> None:
        check_positive(self, ["num_views", "resolution", "supersample", "num_points"])
        if self.num_views < 4:
            raise ConfigError(f"data.synthetic.num_views must be >= 4, got {self.num_views}")


@dataclass
class DataConfig:
    """Where the scene comes from and how it is split and scaled."""

    path: str = "synthetic"  # "synthetic" (embedded generator) or a COLMAP / transforms.json scene directory
    format: SceneFormatName = "auto"  # "auto" detects; else a key of vkd.feature3dgs.data.SCENE_FORMATS
    downscale: int = 1  # integer factor; uses images_<k>/ when present, else resizes on load
    test_every: int = 8  # hold out every N-th image (sorted by name) unless the scene lists its splits
    test_offset: int = 0  # first held-out index (the Replica protocol uses 2)
    white_background: bool = False  # composite RGBA images (NeRF-synthetic) on white instead of black
    max_points: int = 0  # subsample the initial point cloud; 0 keeps all
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        check_positive(self, ["downscale", "test_every"])
        check_nonnegative(self, ["test_offset", "max_points"])


@dataclass
class TinyTeacherConfig(TinyClipConfig):
    """The offline teacher of the synthetic scene: the shared tiny CLIP (:mod:`vkd.models.tiny_clip`) pretrained
    contrastively on captioned crops of the training views, then used through MaskCLIP.

    Every :class:`~vkd.models.tiny_clip.TinyClipConfig` field applies; the defaults below differ from it (patch
    tokens pooled, so dense features share the text space), and ``crops_per_view`` says how many captioned crops
    each training view gives.
    """

    patch_size: int = 8
    pool_type: Literal["tok", "avg"] = "avg"  # avg: patch tokens share the text-aligned space (dense="tokens")
    text_width: int = 0  # 0: the same as embed_dim (the teacher feature width)
    steps: int = 200
    batch_size: int = 64
    lr: float = 2e-3
    crops_per_view: int = 24

    def __post_init__(self) -> None:
        self.clip_config()  # validates the CLIP fields (text_width stays 0 here, so embed_dim overrides follow)
        check_positive(self, ["crops_per_view"])

    def clip_config(self) -> TinyClipConfig:
        """The plain :class:`TinyClipConfig` to pretrain (its fields only: the cache key ignores the crop count)."""
        values = {f.name: getattr(self, f.name) for f in fields(TinyClipConfig)}
        values["text_width"] = self.text_width or self.embed_dim
        return TinyClipConfig(**values)


@dataclass
class TeacherConfig:
    """Dense 2D teacher features (:mod:`vkd.feature3dgs.teacher`)."""

    # auto: tiny_clip for the synthetic scene, maskclip otherwise; callable: ``target`` = "module:function";
    # files: per-image feature files in ``features_dir`` (vkd.feature3dgs.feature_files)
    kind: Literal["auto", "maskclip", "tiny_clip", "callable", "files"] = "auto"
    # maskclip: value path of the last block (MaskCLIP, for CLS-pooled CLIPs); tokens: full final patch tokens
    # (avg-pooled CLIPs); auto: tokens for the avg-pooled tiny CLIP, maskclip otherwise
    dense: Literal["auto", "maskclip", "tokens"] = "auto"
    model: str = "ViT-B-16"  # open_clip model name
    pretrained: str | None = "laion2b_s34b_b88k"  # open_clip pretrained tag or a local checkpoint file
    allow_random_init: bool = False  # offline: fall back to a randomly initialised CLIP (loud warning)
    target: str = ""  # kind=callable: "pkg.module:function", images [B,3,H,W] in [0,1] -> features [B,D,h,w]
    input_size: int = 224  # short image side fed to the teacher (rounded to a multiple of the patch size)
    batch_size: int = 4
    # where the teacher computes the feature cache: auto = the training device (train.device; this process's GPU
    # under torchrun); callable teachers receive their image batches there too
    device: str = "auto"
    cache_dir: str | None = None  # None: <run.output_dir>/feature3dgs/_cache/<scene+teacher hash>
    tiny: TinyTeacherConfig = field(default_factory=TinyTeacherConfig)
    # kind=files: <features_dir>/<image stem>.{npy,pt,safetensors}, one [D,h,w] / [h,w,D] / [h,w] tensor each
    features_dir: str = ""
    # auto: the folder's features.json layout, else the reading whose h x w has the image's aspect (ties: chw)
    features_layout: Literal["auto", "chw", "hwc"] = "auto"
    features_key: str = ""  # tensor name in .safetensors / .pt dict files holding several; "": the only one
    # kind=files text encoder (text queries, label metrics): "" none; "open_clip": the text tower of ``model`` /
    # ``pretrained``; or "pkg.module:function", prompts -> [K, D]
    text_encoder: str = ""

    def __post_init__(self) -> None:
        check_positive(self, ["input_size", "batch_size"])
        if self.kind == "callable" and ":" not in self.target:
            raise ConfigError("teacher.target must be 'module:function' when teacher.kind is 'callable'")
        if self.kind == "files" and not self.features_dir:
            raise ConfigError("teacher.features_dir must name the folder of feature files when teacher.kind is "
                              "'files'")
        if self.text_encoder and self.text_encoder != "open_clip" and ":" not in self.text_encoder:
            raise ConfigError(f"teacher.text_encoder must be 'open_clip' or 'module:function', got "
                              f"{self.text_encoder!r}")
        if self.text_encoder and self.kind != "files":
            raise ConfigError("teacher.text_encoder applies to teacher.kind=files (other teachers bring their own)")


@dataclass
class ModelConfig:
    """The Gaussian feature field (:mod:`vkd.feature3dgs.model`)."""

    render_dim: int = 13  # rendered feature channels N (3 + N = 16 keeps gsplat at one unpadded pass)
    decoder: bool = True  # 1x1 conv render_dim -> teacher_dim; without it render_dim must equal teacher_dim
    sh_degree: int = 3
    sh_degree_interval: int = 1000  # raise the active SH degree every N steps
    init: Literal["auto", "points", "random"] = "auto"  # auto: scene points when present (init_ply wins)
    # A trained 3DGS scene (standard 3DGS PLY) as the initial Gaussians: geometry and SH colour from the file,
    # features as any init (zeros). Its SH bands are zero-padded / truncated to sh_degree. "" = no PLY
    init_ply: str = ""
    num_random_points: int = 20000
    init_opacity: float = 0.1
    init_scale: float = 1.0  # multiplier on the nearest-neighbour initial scale
    background: tuple[float, float, float] | None = None  # RGB background; None: the scene's (features get none)
    backend: Literal["auto", "torch", "gsplat"] = "auto"
    rasterize_mode: Literal["classic", "antialiased"] = "classic"

    def __post_init__(self) -> None:
        check_positive(self, ["render_dim", "sh_degree_interval", "num_random_points", "init_scale"])
        if not 0 <= self.sh_degree <= 3:
            raise ConfigError(f"model.sh_degree must be in 0..3, got {self.sh_degree}")
        if not 0.0 < self.init_opacity < 1.0:
            raise ConfigError(f"model.init_opacity must be in (0, 1), got {self.init_opacity}")
        if self.background is not None and any(not 0.0 <= c <= 1.0 for c in self.background):
            raise ConfigError(f"model.background must be RGB in [0, 1], got {self.background}")
        if self.init_ply and self.init != "auto":
            raise ConfigError(f"model.init={self.init} conflicts with model.init_ply (the PLY gives the Gaussians); "
                              "leave model.init=auto")


@dataclass
class LossConfig:
    """L = (1-λ)·L1(I, Î) + λ·(1-SSIM(I, Î)) + γ·L_feat(F_t, F_s) (spec §4)."""

    ssim_lambda: float = 0.2
    feature_weight: float = 1.0
    feature_loss: Literal["l1", "cosine"] = "l1"
    ssim_window: int = 11

    def __post_init__(self) -> None:
        if not 0.0 <= self.ssim_lambda <= 1.0:
            raise ConfigError(f"loss.ssim_lambda must be in [0, 1], got {self.ssim_lambda}")
        check_nonnegative(self, ["feature_weight"])
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise ConfigError(f"loss.ssim_window must be an odd number >= 3, got {self.ssim_window}")


@dataclass
class OptimConfig:
    """3DGS / Feature 3DGS learning rates (one Adam per attribute, eps 1e-15)."""

    means_lr: float = 1.6e-4  # times the scene extent, decayed exponentially to means_lr_final ...
    means_lr_final: float = 1.6e-6
    # ... over this many steps (3DGS: 30,000, its position_lr_max_steps); 0: over train.steps. A shorter run keeps
    # 3DGS's per-step decay instead of squeezing the whole decay into its own length
    means_lr_decay_steps: int = 30000
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    opacities_lr: float = 5e-2
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    features_lr: float = 1e-3
    decoder_lr: float = 1e-4

    def __post_init__(self) -> None:
        check_nonnegative(self, ["means_lr", "means_lr_final", "means_lr_decay_steps", "sh0_lr", "shN_lr",
                                 "opacities_lr", "scales_lr", "quats_lr", "features_lr", "decoder_lr"])


@dataclass
class DensifyConfig:
    """gsplat ``DefaultStrategy`` (3DGS adaptive density control); defaults equal gsplat's."""

    enabled: bool = True
    refine_start: int = 500
    refine_stop: int = 15000
    refine_every: int = 100
    grow_grad2d: float = 2e-4
    grow_scale3d: float = 0.01
    prune_opa: float = 0.005
    prune_scale3d: float = 0.1
    reset_every: int = 3000
    max_gaussians: int = 0  # stop growing above this count (pruning continues); 0: no cap

    def __post_init__(self) -> None:
        check_positive(self, ["refine_every", "reset_every"])
        check_nonnegative(self, ["refine_start", "refine_stop", "grow_grad2d", "max_gaussians"])


@dataclass
class EvalConfig:
    """``vkd eval feature3dgs`` and the end-of-training evaluation."""

    labels: list[str] = field(default_factory=list)  # text label set; empty: the scene's names, else ADE-like set
    top_k: int = 7  # mIoU over the k most frequent labels (Feature 3DGS protocol)
    max_width: int = 480  # the protocol resizes wider maps to 360x480
    fps_repeats: int = 3
    max_views: int = 0  # 0: all held-out views
    # Segmentation labels: "render" labels student and teacher at the rendered resolution, the teacher's map
    # bilinearly upsampled first (as the Feature 3DGS reference); "teacher_grid" is vkd's earlier protocol
    # (the teacher's patch grid, labels of wide maps subsampled by 3).
    segmentation: Literal["render", "teacher_grid"] = "render"
    # Text prompts of the label set. auto: the teacher's own prompt, i.e. the caption template the embedded tiny CLIP
    # was pretrained with ("a photo of the {}."), raw label names ("{}", as the reference labels with LSeg, whose
    # text encoder was trained on raw names) for every other teacher; or a template with one "{}"
    prompt_template: str = "auto"

    def __post_init__(self) -> None:
        check_positive(self, ["top_k", "max_width", "fps_repeats"])
        check_nonnegative(self, ["max_views"])
        if self.prompt_template != "auto" and self.prompt_template.count("{}") != 1:
            raise ConfigError(f"eval.prompt_template must contain '{{}}' exactly once, got {self.prompt_template!r}")


@dataclass
class QueryConfig:
    """Text queries (relevancy maps and editing)."""

    temperature: float = 10.0  # softmax temperature of the relevancy heat maps
    negatives: list[str] = field(default_factory=lambda: ["object", "things", "stuff", "texture"])
    prompt_template: str = "auto"  # as eval.prompt_template: auto = the teacher's own prompt

    def __post_init__(self) -> None:
        check_positive(self, ["temperature"])
        if self.prompt_template != "auto" and self.prompt_template.count("{}") != 1:
            raise ConfigError(f"query.prompt_template must contain '{{}}' exactly once, got {self.prompt_template!r}")


@dataclass
class ComputeConfig:
    """Process-level compute settings applied by the Feature 3DGS commands (train, eval, render)."""

    # torch CPU threads (torch.set_num_threads); 0 keeps torch's default. The CPU rasterizer runs many small ops:
    # on a shared, oversubscribed machine 2 threads measured 10-100x slower than 1 (OpenMP threads wait for each
    # other), so the CPU presets use 1.
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        check_nonnegative(self, ["cpu_threads"])


@dataclass
class LiftConfig:
    """Training-free lifting (``vkd lift``, :mod:`vkd.feature3dgs.lift`)."""

    save_every: int = 10  # views per batch: the sums are saved (resumable) and, on several processes, reduced

    def __post_init__(self) -> None:
        check_positive(self, ["save_every"])


@dataclass
class Feature3DGSTrainConfig(TrainConfig):
    """The shared training options plus Feature 3DGS's own."""

    # Train only the features and the decoder: the Gaussians' geometry and SH colour keep their initial values
    # (typically model.init_ply), bit for bit; densification is off whatever densify.enabled says.
    freeze_geometry: bool = False


def _default_train() -> Feature3DGSTrainConfig:
    return Feature3DGSTrainConfig(steps=7000, batch_size=1, lr=1e-3, optimizer="adam", log_every=50,
                                  checkpoint_every=1000)


@dataclass
class Feature3DGSConfig(TaskConfig):
    """Feature 3DGS: distil dense CLIP features into a 3D Gaussian feature field."""

    task: str = "feature3dgs"
    train: Feature3DGSTrainConfig = field(default_factory=_default_train)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    lift: LiftConfig = field(default_factory=LiftConfig)

    def __post_init__(self) -> None:
        if self.train.freeze_geometry and self.densify.enabled:
            self.densify.enabled = False  # frozen geometry cannot grow or prune: the saved config says so
        if self.densify.enabled and self.train.mixed_precision == "fp16":
            raise ConfigError("train.mixed_precision=fp16 with densify.enabled: densification reads the screen-space "
                              "gradients before the fp16 loss scale is removed; use bf16 or no")


def cache_root(cfg: Feature3DGSConfig) -> Path:
    """``<run.output_dir>/feature3dgs/_cache``: the generated scene, tiny CLIPs and teacher features of a config."""
    return Path(cfg.run.output_dir) / cfg.task / "_cache"
