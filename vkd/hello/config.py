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
    upsampled to ``image_size``, held in RAM. The file-backed sources are indexed and **streamed** (decoded per
    batch in DataLoader workers, resized on the shorter side and centre-cropped to ``image_size``):
    ``imagefolder``: ``torchvision.datasets.ImageFolder`` trees ``train_dir`` / ``val_dir`` (one sub-folder per
    class, same folders in both); ``filelist``: text files ``train_list`` / ``val_list`` of ``<path> <label>``
    lines; ``shards``: webdataset-style uncompressed tar shards ``train_shards`` / ``val_shards``
    (``<key>.jpg`` + ``<key>.cls``; paths, globs or ``{000..099}`` ranges).
    """

    source: Literal["digits", "imagefolder", "filelist", "shards"] = "digits"
    train_dir: str = ""
    val_dir: str = ""
    train_list: str = ""  # filelist: lines "<image path> <label>" (label: class index or class name)
    val_list: str = ""
    list_root: str = ""  # filelist: folder relative paths are resolved against (default: the list's folder)
    train_shards: list[str] = field(default_factory=list)  # shards: tar paths, globs or brace ranges
    val_shards: list[str] = field(default_factory=list)
    image_size: int = 16  # digits are 8×8: 16 px keeps every detail at a quarter of 32 px's CPU cost
    max_per_class: int = 0  # file-backed sources: keep at most this many images per class (0: all)
    class_names: list[str] = field(default_factory=list)  # prompt names in class-index order (default: from data)
    class_names_file: str = ""  # or one prompt name per line, in class-index order (e.g. ImageNet-1K's 1000)
    # DataLoader workers decoding file-backed images in the scoring / evaluation passes (training: train.num_workers)
    num_workers: int = 2
    # file-backed sources: decode every file once when the data is indexed (in the workers, nothing kept) so that
    # unreadable files are left out and counted at once and a class without a readable file fails early, as the
    # in-RAM loader did; false (ImageNet-scale sets: no extra pass): skipped and counted when a pass meets them
    verify: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {self.image_size}")
        if self.max_per_class < 0 or self.num_workers < 0:
            raise ConfigError("data.max_per_class and data.num_workers must be >= 0")
        need = {"imagefolder": ("train_dir", self.train_dir), "filelist": ("train_list", self.train_list),
                "shards": ("train_shards", self.train_shards)}.get(self.source)
        if need is not None and not need[1]:
            raise ConfigError(f"data.{need[0]} must be set when data.source is '{self.source}'")
        if self.class_names and self.class_names_file:
            raise ConfigError("set data.class_names or data.class_names_file, not both")


@dataclass
class ClassifierConfig:
    """A classifier (teacher or student), by architecture name.

    ``arch``: ``small_cnn`` (vkd's ConvNet), any torchvision classification model
    (``torchvision.models.list_models()``: ``resnet18``, ``mobilenet_v2``, ``efficientnet_b0``, ``vgg11``,
    ``swin_t``, ...) or any timm model (``timm.list_models()``, optionally with a weights tag:
    ``resnet10t.c3_in1k``). A bare name is looked up in torchvision first; ``torchvision:NAME`` / ``timm:NAME``
    pick the library. Any class count: the classifier head is built for the dataset.
    """

    arch: str = "small_cnn"
    width: int = 32  # small_cnn: channels of the first block (doubled per block)
    depth: int = 3  # small_cnn: conv blocks (each halves the resolution)
    norm: Literal["batch", "instance", "group", "none"] = "batch"  # small_cnn normalisation
    # torchvision ResNets: 3×3 stride-1 stem without max-pool (None: when the image is ≤ 64 px)
    low_res_stem: bool | None = None
    # "": random init; "imagenet": the library's ImageNet weights from the local torch hub / Hugging Face cache
    # (never downloaded); else a local .safetensors / torch state dict. A head of another class count is replaced.
    pretrained: str = ""
    init: Literal["random", "imagenet"] = "random"  # older spelling of pretrained=imagenet (saved runs)
    init_checkpoint: str = ""  # older spelling of pretrained=<file> (saved runs)

    def __post_init__(self) -> None:
        if self.width <= 0 or self.depth <= 0:
            raise ConfigError("model width and depth must be > 0")
        if not self.arch.strip():
            raise ConfigError("model.arch must not be empty")
        old = self.init_checkpoint or ("imagenet" if self.init == "imagenet" else "")
        if old:
            if self.pretrained and self.pretrained != old:
                raise ConfigError(f"model.pretrained={self.pretrained!r} conflicts with the older init / "
                                  f"init_checkpoint ({old!r}); set only pretrained")
            # folded once: the saved config says pretrained=..., and reloading it gives the same model
            self.pretrained, self.init, self.init_checkpoint = old, "random", ""


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
    state dict of a ``model``-shaped classifier, or ``imagenet`` for the library's ImageNet weights of
    ``model.arch`` (from the local cache), used alone; its class count must be the dataset's.
    """

    run: str = ""
    checkpoint: str = ""
    model: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(arch="resnet18"))  # for checkpoint
    snapshots: list[int] = field(default_factory=list)  # indices of weak teachers for fitting (empty: all)
    sampling: Literal["uniform_per_batch", "final_only", "mean_logits"] = "uniform_per_batch"
    # weak teachers whose recorded test accuracy is below this are not sampled (the paper's trajectory of useful
    # teachers; 0: all snapshots)
    min_snapshot_accuracy: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_snapshot_accuracy <= 1.0:
            raise ConfigError(f"teacher.min_snapshot_accuracy must be in [0, 1], got {self.min_snapshot_accuracy}")


@dataclass
class ClipConfig:
    """The CLIP behind the projector: ``model_name="tiny"`` pretrains vkd's tiny CLIP (cached), any other value is
    an open_clip name with its ``pretrained`` tag or file.

    ``tiny_data`` is what the tiny CLIP is pretrained on, with ``prompt_template`` captions: ``printed_digits``
    (digits rendered from matplotlib's fonts, :mod:`vkd.hello.printed_digits`; no image of the target task, so the
    CLIP plays a public model), ``train`` (the task's own labelled training split: a smoke-test stand-in that
    has seen the target labels) or ``auto`` (``printed_digits`` on the digits, ``train`` otherwise).
    """

    model_name: str = "tiny"
    pretrained: str = ""
    prompt_template: str = "a photo of the digit {}."
    tiny: TinyClipConfig = field(default_factory=lambda: TinyClipConfig(image_size=16, patch_size=4))
    tiny_data: Literal["auto", "printed_digits", "train"] = "auto"
    printed_per_font: int = 16  # printed_digits: jittered copies of each digit per font (19 fonts)
    cache_dir: str = ""  # tiny CLIP cache root (default $VKD_CACHE_DIR or ~/.cache/vkd)

    def __post_init__(self) -> None:
        if "{}" not in self.prompt_template:
            raise ConfigError(f"clip.prompt_template must contain '{{}}', got {self.prompt_template!r}")
        if self.printed_per_font < 1:
            raise ConfigError(f"clip.printed_per_font must be >= 1, got {self.printed_per_font}")


@dataclass
class ProjectorConfig:
    """The label projector f(x) = s · normalize(E_I(x)) · W with LoRA on E_I and on W (peft)."""

    lora_backend: Literal["peft"] = "peft"
    # regexes on visual module names; empty: per CLIP architecture (ViT: patch conv + attention + MLP,
    # ResNet: every conv outside the attention pool; see projector.image_lora_targets)
    image_targets: list[str] = field(default_factory=list)
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
    steps: int = 300  # used when epochs is 0
    # > 0: train for this many passes over the distilled set (the paper's 300 / 1000 epochs);
    # steps = epochs × ceil(N / batch), the last batch of an epoch holding the remainder
    epochs: int = 0
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
        if self.epochs < 0:
            raise ConfigError(f"student.epochs must be >= 0, got {self.epochs}")
        if not 0.0 < self.crop_scale_min <= 1.0 or not 0.0 <= self.cutmix <= 1.0 \
                or not 0.0 <= self.tile_views <= 1.0:
            raise ConfigError("student.crop_scale_min must be in (0, 1], cutmix and tile_views in [0, 1]")


LabelSource = Literal["hard", "teacher", "projector", "zero_shot", "random"]


@dataclass
class EvalConfig:
    """``vkd eval hello``: label sources compared side by side, per student architecture, and the storage comparison.

    Sources: ``hard`` (CE only), ``teacher`` (online), ``projector`` (HeLlO, online), ``zero_shot`` (the CLIP
    zero-shot classifier the projector starts from, online), ``random`` (random real images, labelled by
    ``random_label_source``).
    """

    sources: list[LabelSource] = field(
        default_factory=lambda: ["hard", "teacher", "projector", "zero_shot", "random"])
    seeds: list[int] = field(default_factory=lambda: [0])
    # architectures of the students (one row each, e.g. [resnet18, mobilenet_v2, efficientnet_b0, vgg11, swin_t]);
    # empty: student.model.arch alone. The other student.model settings apply to every entry.
    students: list[str] = field(default_factory=list)
    random_label_source: Literal["projector", "teacher", "zero_shot", "hard"] = "projector"
    storage_epochs: int = 300  # K of the SRe2L-style stored soft labels
    storage_crops: int = 1  # crops per image per epoch
    storage_dtype: Literal["fp16", "fp32"] = "fp16"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if not self.sources or not self.seeds:
            raise ConfigError("eval.sources and eval.seeds must not be empty")
        if self.storage_epochs < 1 or self.storage_crops < 1:
            raise ConfigError("eval.storage_epochs and storage_crops must be >= 1")
        if len(set(self.students)) != len(self.students):
            raise ConfigError(f"eval.students lists an architecture twice: {self.students}")


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
