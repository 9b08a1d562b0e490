"""Typed configs of the two HeLlO tasks: ``hello-teacher`` (train the soft-label teacher) and ``hello``
(fit the CLIP + LoRA label projector, select and update the synthetic images, evaluate students).

Every detail the paper does not publish is an option whose default is marked in the spec (hello.md §10).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vkd.config import TaskConfig, TrainConfig
from vkd.errors import ConfigError
from vkd.models.tiny_clip import TinyClipConfig

__all__ = [
    "HelloDataConfig",
    "ClassifierConfig",
    "HelloTeacherConfig",
    "TeacherRefConfig",
    "ClipConfig",
    "ProjectorConfig",
    "SelectionConfig",
    "ImageUpdateConfig",
    "StudentConfig",
    "EvalConfig",
    "HelloConfig",
]


@dataclass
class HelloDataConfig:
    """Where the labelled images come from.

    ``digits``: scikit-learn's 8×8 digits, fixed stratified 80/20 split (``vkd.data.digits``),
    upsampled to ``image_size``. ``imagefolder``: ``torchvision.datasets.ImageFolder`` trees
    ``train_dir`` / ``val_dir`` (one sub-folder per class, same folders in both); images are resized
    (shorter side) and centre-cropped to ``image_size`` and held in RAM as uint8.
    """

    source: Literal["digits", "imagefolder"] = "digits"
    train_dir: str = ""
    val_dir: str = ""
    image_size: int = 16  # digits are 8×8: 16 px keeps every detail at a quarter of 32 px's CPU cost
    max_per_class: int = 0  # ImageFolder only: keep at most this many images per class (0: all)
    class_names: list[str] = field(default_factory=list)  # prompt names in class-index order (default: from data)

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {self.image_size}")
        if self.max_per_class < 0:
            raise ConfigError(f"data.max_per_class must be >= 0, got {self.max_per_class}")
        if self.source == "imagefolder" and not self.train_dir:
            raise ConfigError("data.train_dir must be set when data.source is 'imagefolder'")


@dataclass
class ClassifierConfig:
    """A classifier (teacher or student): ``small_cnn`` (vkd ConvNet) or torchvision ``resnet18``."""

    arch: Literal["small_cnn", "resnet18"] = "small_cnn"
    width: int = 32  # small_cnn: channels of the first block (doubled per block)
    depth: int = 3  # small_cnn: conv blocks (each halves the resolution)
    norm: Literal["batch", "instance", "group", "none"] = "batch"  # small_cnn normalisation
    low_res_stem: bool | None = None  # resnet18: 3×3 stride-1 stem without max-pool (None: when image ≤ 64 px)
    init: Literal["random", "imagenet"] = "random"  # resnet18: ImageNet weights from the torch hub cache
    init_checkpoint: str = ""  # optional local state dict (.pth/.pt/.safetensors) loaded before training

    def __post_init__(self) -> None:
        if self.width <= 0 or self.depth <= 0:
            raise ConfigError("model width and depth must be > 0")


@dataclass
class TeacherTrainExtra:
    """Augmentation and weak-teacher snapshots of ``hello-teacher``."""

    num_snapshots: int = 9  # weak teachers saved at evenly spaced steps along training (the last is final)
    crop_scale_min: float = 0.6  # RandomResizedCrop(scale=(crop_scale_min, 1)) during training; 1 disables
    hflip: bool = False
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.num_snapshots < 1:
            raise ConfigError(f"snapshots.num_snapshots must be >= 1, got {self.num_snapshots}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")


@dataclass
class HelloTeacherConfig(TaskConfig):
    """``vkd distill hello-teacher``: train the soft-label generator and its weak-teacher snapshots."""

    task: str = "hello-teacher"
    data: HelloDataConfig = field(default_factory=HelloDataConfig)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    extra: TeacherTrainExtra = field(default_factory=TeacherTrainExtra)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=64, lr=2e-3, weight_decay=5e-4, scheduler="cosine", log_every=50,
        checkpoint_every=300))


@dataclass
class TeacherRefConfig:
    """Which teacher ``hello`` uses.

    ``run``: a ``hello-teacher`` run directory (default ``<run.output_dir>/hello-teacher/default``),
    which provides the final teacher and its weak-teacher snapshots. ``checkpoint``: instead, a
    state dict of a ``model``-shaped classifier (e.g. torchvision ResNet-18 weights), used alone.
    """

    run: str = ""
    checkpoint: str = ""
    model: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(arch="resnet18"))  # for checkpoint
    snapshots: list[int] = field(default_factory=list)  # indices of weak teachers for fitting (empty: all)
    sampling: Literal["uniform_per_batch", "final_only", "mean_logits"] = "uniform_per_batch"


@dataclass
class ClipConfig:
    """The CLIP behind the projector: ``model_name="tiny"`` pretrains vkd's tiny CLIP on the training
    split (cached), any other value is an open_clip name with its ``pretrained`` tag or file."""

    model_name: str = "tiny"
    pretrained: str = ""
    prompt_template: str = "a photo of the digit {}."
    tiny: TinyClipConfig = field(default_factory=lambda: TinyClipConfig(image_size=16, patch_size=4))
    cache_dir: str = ""  # tiny CLIP cache root (default $VKD_CACHE_DIR or ~/.cache/vkd)

    def __post_init__(self) -> None:
        if "{}" not in self.prompt_template:
            raise ConfigError(f"clip.prompt_template must contain '{{}}', got {self.prompt_template!r}")


@dataclass
class ProjectorConfig:
    """The label projector f(x) = s · normalize(E_I(x)) · W with LoRA on E_I and on W (peft)."""

    lora_backend: Literal["peft"] = "peft"
    image_targets: list[str] = field(default_factory=list)  # regexes on visual module names (empty: auto)
    rank_image: int = 2  # 0 disables LoRA on the image encoder
    rank_head: int = 4
    lora_alpha_image: float = 0.0  # 0: equal to the rank (scale 1)
    lora_alpha_head: float = 0.0
    lora_dropout: float = 0.0
    # "centered_logits": MSE after subtracting each sample's mean logit from both sides. Logits are
    # defined up to a per-sample constant (softmax-invariant) and the bias-free head cannot produce one.
    fit_target: Literal["logits", "centered_logits", "probs"] = "logits"
    lambda_ce: float = 0.1
    aug_fraction: float = 0.5  # fraction of each fitting batch passed through the student augmentation
    adapter_dtype: Literal["fp16", "fp32"] = "fp16"  # dtype of the shipped adapter file

    def __post_init__(self) -> None:
        if self.rank_image < 0 or self.rank_head < 0:
            raise ConfigError("projector ranks must be >= 0")
        if self.rank_image == 0 and self.rank_head == 0:
            raise ConfigError("projector.rank_image and projector.rank_head cannot both be 0")
        if not 0.0 <= self.aug_fraction <= 1.0:
            raise ConfigError(f"projector.aug_fraction must be in [0, 1], got {self.aug_fraction}")
        if self.lambda_ce < 0 or self.lora_alpha_image < 0 or self.lora_alpha_head < 0:
            raise ConfigError("projector.lambda_ce and lora alphas must be >= 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"projector.lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class SelectionConfig:
    """RDED-style initialisation: teacher-scored real crops, stitched factor × factor."""

    ipc: int = 10
    factor: int = 0  # 0: 1 when image_size <= 64 px else 2
    mipc: int = 300  # real images scored per class
    num_crop: int = 5  # RandomResizedCrops per image (ratio 1)
    # area range of the scored crops; None: (1, 1) (whole images) at factor 1, RDED's (0.08, 1) at factor >= 2.
    # Measured on digits (IPC 10, factor 1): (0.5, 1) crops cost 1-3 points of student accuracy vs whole images.
    crop_scale: tuple[float, float] | None = None
    # lowest_ce: RDED (most confident crops); cluster: the crop nearest the centroid of each of IPC·f² k-means
    # clusters of the teacher's penultimate features (coverage of the class instead of near-copies of its mode)
    strategy: Literal["lowest_ce", "cluster"] = "lowest_ce"
    # cluster only: a pick must also be labelled right (p > 1/2) by the projector that will label the set
    projector_agreement: bool = True

    def __post_init__(self) -> None:
        if self.ipc < 1 or self.mipc < 1 or self.num_crop < 1 or self.factor < 0:
            raise ConfigError("selection.ipc, mipc, num_crop must be >= 1 and factor >= 0")
        if self.crop_scale is not None and not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(f"selection.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


@dataclass
class ImageUpdateConfig:
    """G = MSE(E_I(p), E_I(up(z))) minimised over the stored low-resolution patches z."""

    enabled: bool = True
    encoder: Literal["projector", "clip"] = "projector"
    steps: int = 30
    lr: float = 0.01

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0:
            raise ConfigError("image_update.steps must be >= 0 and lr > 0")


@dataclass
class StudentConfig:
    """Student training on the distilled set with labels generated online per augmented view."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    steps: int = 300
    batch_size: int = 100  # capped at the number of distilled images
    lr: float = 3e-3  # measured on digits: 1e-3 underfits in 300 steps (RDED's ResNet-18 value is 1e-3)
    weight_decay: float = 0.01
    label_loss: Literal["mse_ce", "kl"] = "mse_ce"
    beta_ce: float = 0.1
    temperature: float = 4.0  # label_loss="kl" only
    crop_scale_min: float = 0.5  # RandomResizedCrop(scale=(crop_scale_min, 1)) (RDED uses 1/factor)
    # stitched sets (factor > 1): probability that a view is one tile of the mosaic, up-sampled to full size,
    # before the crop. RDED's views always span several tiles (0); a small teacher cannot read those.
    tile_views: float = 0.0
    hflip: bool = False
    cutmix: float = 0.0  # probability of CutMix per batch

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("student.steps, batch_size, lr and temperature must be > 0")
        if not 0.0 < self.crop_scale_min <= 1.0 or not 0.0 <= self.cutmix <= 1.0 \
                or not 0.0 <= self.tile_views <= 1.0:
            raise ConfigError("student.crop_scale_min must be in (0, 1], cutmix and tile_views in [0, 1]")


@dataclass
class EvalConfig:
    """``vkd eval hello``: label sources compared side by side and the storage comparison."""

    sources: list[Literal["hard", "teacher", "projector", "random"]] = field(
        default_factory=lambda: ["hard", "teacher", "projector", "random"])
    seeds: list[int] = field(default_factory=lambda: [0])
    random_label_source: Literal["projector", "teacher", "hard"] = "projector"
    storage_epochs: int = 300  # K of the SRe2L-style stored soft labels
    storage_crops: int = 1  # crops per image per epoch
    storage_dtype: Literal["fp16", "fp32"] = "fp16"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if not self.sources or not self.seeds:
            raise ConfigError("eval.sources and eval.seeds must not be empty")
        if self.storage_epochs < 1 or self.storage_crops < 1:
            raise ConfigError("eval.storage_epochs and storage_crops must be >= 1")


@dataclass
class HelloConfig(TaskConfig):
    """``vkd distill hello``: projector fit (the ``train`` section) → selection → image update → export."""

    task: str = "hello"
    data: HelloDataConfig = field(default_factory=HelloDataConfig)
    teacher: TeacherRefConfig = field(default_factory=TeacherRefConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    image_update: ImageUpdateConfig = field(default_factory=ImageUpdateConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=400, batch_size=64, lr=1e-3, weight_decay=0.0, scheduler="cosine", log_every=50,
        checkpoint_every=200))
