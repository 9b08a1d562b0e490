"""Configs of ``vkd distill skt-teacher`` and ``vkd distill skt`` (spec §15 defaults).

The dataclass defaults are the embedded default (synthetic crowds, CPU-sized); the reference recipe
on ShanghaiTech A / UCF-QNRF lives in the YAML presets under ``configs/skt/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vkd.config import TaskConfig, TrainConfig, check_nonnegative, check_positive
from vkd.errors import ConfigError
from vkd.skt.density import KernelSpec
from vkd.skt.layouts import LAYOUTS, UCF_CC_50_FOLDS
from vkd.skt.losses import SKT_LOSS_TERMS

__all__ = [
    "DATASETS",
    "CSRNetConfig",
    "StudentConfig",
    "DensityConfig",
    "SyntheticConfig",
    "CrowdDataConfig",
    "CrowdEvalConfig",
    "SKTLossConfig",
    "TeacherRefConfig",
    "SKTTrainConfig",
    "SKTStudentTrainConfig",
    "SKTTeacherConfig",
    "SKTConfig",
]

# ``data.dataset``: the embedded synthetic crowds (written in the ``generic`` layout) or a layout of the table
DATASETS = ("synthetic", *LAYOUTS)
DatasetName = Literal[DATASETS]  # type: ignore[valid-type]  # derived from vkd.skt.layouts.LAYOUTS


@dataclass
class CSRNetConfig:
    """The network trained by the task.

    Attributes:
        width_div: 1 = CSRNet teacher, 4 = the SKT 1/4 student (2, 3, 5 also work).
        ceil_mode: max-pool rounding (SKT: true).
        weights: ``none`` (random init), ``imagenet`` (torchvision VGG16_Weights.IMAGENET1K_V1 into the
            frontend; needs the file in the torch hub cache or network), or a local path to a VGG-16 state
            dict (``vgg16-397923af.pth``) or to a full CSRNet / SKT checkpoint to start from.
        init: ``auto`` (``reference`` N(0, 0.01) when ImageNet weights are loaded, else ``kaiming``),
            ``kaiming`` or ``reference``.
    """

    width_div: int = 1
    ceil_mode: bool = True
    weights: str = "none"
    init: Literal["auto", "kaiming", "reference"] = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.width_div <= 16:
            raise ConfigError(f"model.width_div must be in 1..16, got {self.width_div}")


@dataclass
class StudentConfig(CSRNetConfig):
    """The SKT student: a 1/4 CSRNet with Kaiming init and no ImageNet weights by default (spec §1.2)."""

    width_div: int = 4


@dataclass
class DensityConfig:
    """Ground-truth density maps (spec §7, §15).

    Attributes:
        kernel: ``adaptive`` (k-NN × β: ShanghaiTech A), ``nn_capped`` (UCF-QNRF) or ``fixed`` (ShanghaiTech B).
        k: neighbours of ``adaptive``.
        beta: β of ``adaptive``.
        cap: cap of ``nn_capped``.
        sigma: σ of ``fixed``.
        border: ``renormalize`` (count-preserving default), ``constant``, ``reflect`` or ``mirror``.
        truncate: kernel radius in σ.
        downsample: ``sum_pool`` (count-preserving) or ``bicubic_x64`` (reference).
        cache: keep the maps on disk (:class:`vkd.skt.density.DensityCache`), outside the data set.
        cache_dir: the cache root (default ``$VKD_CACHE_DIR/skt/density``); each split's maps go to
            ``<cache_dir>/<data set fingerprint>/`` (:func:`vkd.skt.density.dataset_fingerprint`).
        cache_resolution: what is stored: ``eighth`` (sum-pooled to the 1/8 output grid, float16: 1/128 of the
            full-resolution bytes; training crops are then taken on the 8-pixel grid), ``full`` (full-resolution
            float32) or ``auto`` (``full`` for ``bicubic_x64``, which needs pixels, else ``eighth``).
    """

    kernel: Literal["adaptive", "nn_capped", "fixed"] = "adaptive"
    k: int = 3
    beta: float = 0.3
    cap: float = 30.0
    sigma: float = 15.0
    border: Literal["constant", "reflect", "mirror", "renormalize"] = "renormalize"
    truncate: float = 4.0
    downsample: Literal["sum_pool", "bicubic_x64"] = "sum_pool"
    cache: bool = True
    cache_dir: str | None = None
    cache_resolution: Literal["auto", "eighth", "full"] = "auto"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"data.density.k must be >= 1, got {self.k}")
        check_positive(self, ["beta", "cap", "sigma", "truncate"])

    def stored_resolution(self, downsample: str) -> Literal["eighth", "full"]:
        """What the cache stores for the effective ``downsample`` (``cache_resolution`` with ``auto`` resolved)."""
        if self.cache_resolution == "auto":
            return "full" if downsample == "bicubic_x64" else "eighth"
        if self.cache_resolution == "eighth" and downsample != "sum_pool":
            raise ConfigError(f"data.density.cache_resolution=eighth stores sum-pooled maps; downsample={downsample} "
                              "needs full-resolution ones (use cache_resolution=auto or full)")
        return self.cache_resolution

    def spec(self, reference_parity: bool = False) -> KernelSpec:
        border = self.border
        if reference_parity:  # SHB's single gaussian_filter uses scipy's reflect; the per-head ones constant
            border = "reflect" if self.kernel == "fixed" else "constant"
        return KernelSpec(self.kernel, self.k, self.beta, self.cap, self.sigma, border, self.truncate)


@dataclass
class SyntheticConfig:
    """The embedded synthetic-crowd generator (used when ``data.dataset=synthetic``)."""

    num_train: int = 400
    num_test: int = 100
    height: int = 96
    width: int = 96
    count_min: int = 3
    count_max: int = 200
    min_person: float = 12.0  # smallest figure height in pixels (heads ~1/6 of it)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_test < 1:
            raise ConfigError("data.synthetic.num_train and num_test must be >= 1")
        if self.height < 16 or self.width < 16:
            raise ConfigError(f"data.synthetic images must be at least 16x16, got {self.height}x{self.width}")
        if not 1 <= self.count_min <= self.count_max:
            raise ConfigError(f"need 1 <= data.synthetic.count_min <= count_max, got {self.count_min}, {self.count_max}")
        check_positive(self, ["min_person"])


@dataclass
class CrowdDataConfig:
    """Data set, augmentation and ground truth.

    Attributes:
        dataset: ``synthetic`` (embedded default, generated on first use) or a layout of
            :data:`vkd.skt.layouts.LAYOUTS`: ``shanghaitech``, ``ucf-qnrf``, ``jhu-crowd``, ``nwpu-crowd``,
            ``ucf-cc-50`` or ``generic`` (image + JSON/CSV/TXT/NPY head points).
        root: data set root (for ``synthetic``: where to generate; default ``$VKD_CACHE_DIR/skt/synthetic-<hash>``).
        train_split: training split (``train`` → ``train_data`` / ``Train`` / ``train``). Any split may instead name
            a CSRNet-pytorch JSON image list (``part_A_train.json``; a relative path is read from the working
            directory or ``root``): the listed images with their annotations.
        test_split: split of ``vkd eval`` and of the end-of-training evaluation.
        val_split: optional held-out split also evaluated during training (a named split of the data set, such as
            NWPU-Crowd's ``val``; never a subset of train).
        val_fraction: a validation set carved from the training split instead (a fraction in (0, 1) or a count of
            images, drawn with seed 0; the official SKT selects on ``A_val.json``, a subset of train): the images
            it takes are not trained on. Its ``val_mae`` / ``val_rmse`` drive ``train.select_best``.
        crop: ``ratio`` (reference: side × U(crop_ratio)), ``fixed`` (``crop_size`` squares) or ``none``.
        crop_ratio: range of the ``ratio`` crop.
        crop_size: side of ``fixed`` crops.
        flip_prob: horizontal flip probability.
        repeat: the training list is repeated this many times per epoch.
        max_side: downscale training (and carved validation) images whose long side exceeds this at load (0: never;
            BL uses 2048 on UCF-QNRF). Evaluation has its own, ``eval.max_side``.
        min_size: smallest accepted image side.
        fold: the UCF_CC_50 cross-validation fold, 0..4: ``test`` is that fold (images 10k+1..10k+10), ``train``
            the other four. Only for ``dataset=ucf-cc-50``.
        annotations: ``auto`` (head points where a point file exists, else a CSRNet-pytorch ``.h5`` density) or
            ``h5`` (the ``.h5`` density maps, ``ground_truth/NAME.h5`` with dataset ``density``, even where point
            files exist: CSRNet-pytorch's own targets; needs ``pip install 'vkd[h5]'``).
        gt_count: evaluation ground truth: ``points`` (annotated heads) or ``density_sum`` (reference).
        reference_parity: reference density maps: ``constant`` borders (``reflect`` for fixed σ),
            ``bicubic_x64``, ``density_sum`` counts and duplicate heads collapsed.
        preload: keep decoded training images and maps in memory.
    """

    dataset: DatasetName = "synthetic"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    val_split: str | None = None
    val_fraction: float = 0.0
    density: DensityConfig = field(default_factory=DensityConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    crop: Literal["ratio", "fixed", "none"] = "none"
    crop_ratio: tuple[float, float] = (0.5, 1.0)
    crop_size: int = 256
    flip_prob: float = 0.5
    repeat: int = 1
    max_side: int = 0
    min_size: int = 8
    fold: int = 0
    annotations: Literal["auto", "h5"] = "auto"
    gt_count: Literal["points", "density_sum"] = "points"
    reference_parity: bool = False
    preload: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crop_ratio must satisfy 0 < lo <= hi <= 1, got {self.crop_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ConfigError(f"data.flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.crop_size < 8 or self.min_size < 1 or self.repeat < 1 or self.max_side < 0:
            raise ConfigError("data.crop_size must be >= 8, data.min_size >= 1, data.repeat >= 1, data.max_side >= 0")
        self.density.stored_resolution(self.effective_downsample())  # eighth + bicubic_x64: refused at load
        if self.dataset != "synthetic" and not self.root:
            raise ConfigError(f"data.root is required for data.dataset={self.dataset}")
        if self.val_fraction < 0:
            raise ConfigError(f"data.val_fraction must be >= 0 (a fraction in (0, 1) or a count), got "
                              f"{self.val_fraction}")
        if not 0 <= self.fold < UCF_CC_50_FOLDS:
            raise ConfigError(f"data.fold must be in 0..{UCF_CC_50_FOLDS - 1}, got {self.fold}")
        if self.fold and self.dataset != "ucf-cc-50":
            raise ConfigError(f"data.fold selects a UCF_CC_50 cross-validation fold; data.dataset is {self.dataset}")
        if self.val_fraction and self.val_split:
            raise ConfigError("data.val_fraction (carved from train) and data.val_split (a named split) are two "
                              "validation sets; set one")

    @property
    def layout(self) -> str:
        """The key of :data:`vkd.skt.layouts.LAYOUTS` the data set is read with."""
        return "generic" if self.dataset == "synthetic" else self.dataset

    def effective_downsample(self) -> str:
        return "bicubic_x64" if self.reference_parity else self.density.downsample

    def effective_gt_count(self) -> str:
        return "density_sum" if self.reference_parity else self.gt_count


@dataclass
class CrowdEvalConfig:
    """Evaluation (``vkd eval``, end of training) and counting.

    Attributes:
        split: split to evaluate (default: ``data.test_split``).
        max_side: downscale evaluation images whose long side exceeds this (0, the default: full resolution, tiled:
            SKT's UCF-QNRF protocol; 2048: the downscaled protocol of BL / DM-Count). Training keeps
            ``data.max_side``.
        tile_size: images larger than this (either side) are cut into near-equal tiles (0: never tile).
        tile_overlap: overlap in pixels between tiles; overlapping densities are averaged.
        max_images: evaluate only the first N images (0: all).
    """

    split: str | None = None
    max_side: int = 0
    tile_size: int = 512
    tile_overlap: int = 0
    max_images: int = 0

    def __post_init__(self) -> None:
        check_nonnegative(self, ["max_side", "tile_size", "tile_overlap", "max_images"])
        if self.tile_size and self.tile_overlap >= self.tile_size:
            raise ConfigError(f"eval.tile_overlap ({self.tile_overlap}) must be < eval.tile_size ({self.tile_size})")
        if self.tile_size and self.tile_size < 16:
            raise ConfigError(f"eval.tile_size must be 0 or >= 16, got {self.tile_size}")


@dataclass
class SKTLossConfig:
    """SKT objective weights (spec §5): ``gt‖D_S−D_GT‖² + teacher‖D_S−D_T‖² + fsp·L_inter + cos·L_intra``.

    One ``*_weight`` field per term of :data:`vkd.skt.losses.SKT_LOSS_TERMS` (its ``weight_key``).

    Attributes:
        gt_weight: ground-truth density term.
        teacher_weight: teacher density term.
        cos_weight: λ_cos, intra-layer cosine transfer.
        fsp_weight: λ_fsp, inter-layer dense FSP transfer.
        reduction: ``sum`` (reference: sums over pixels/entries; the presets for real data use it) or ``mean``
            (each term averaged over its pixels / matrix entries: all terms O(1); the embedded default uses it
            because with ``sum`` the cosine and FSP terms are ~100× the density terms and a few hundred steps
            do not suffice to calibrate the counts).
        fsp: ``per_sample`` (vkd) or ``reference`` (batch element 0 only, the reference's bug).
    """

    gt_weight: float = 1.0
    teacher_weight: float = 1.0
    cos_weight: float = 0.5
    fsp_weight: float = 0.5
    reduction: Literal["sum", "mean"] = "mean"
    fsp: Literal["per_sample", "reference"] = "per_sample"

    def __post_init__(self) -> None:
        check_nonnegative(self, list(self.weights()))

    def weights(self) -> dict[str, float]:
        """``{weight_key: weight}`` of every term of :data:`~vkd.skt.losses.SKT_LOSS_TERMS`."""
        return {term.weight_key: getattr(self, term.weight_key) for term in SKT_LOSS_TERMS.values()}

    @property
    def uses_teacher(self) -> bool:
        """A term that compares with the teacher has a non-zero weight (else no teacher is loaded)."""
        return any(getattr(self, t.weight_key) for t in SKT_LOSS_TERMS.values() if t.needs_teacher)

    @property
    def needs_adapters(self) -> bool:
        """A term on the adapted student taps has a non-zero weight (else the 1×1 adapters are not built)."""
        return any(getattr(self, t.weight_key) for t in SKT_LOSS_TERMS.values() if t.needs_adapters)


@dataclass
class TeacherRefConfig:
    """Where the frozen teacher comes from.

    Attributes:
        run: a ``vkd distill skt-teacher`` run directory, or a checkpoint file (vkd ``.safetensors``, a
            CSRNet-pytorch ``.pth.tar``). Empty: ``<run.output_dir>/skt-teacher/<run.name>``.
        width_div: the teacher's width divisor (1 for CSRNet).
        precision: arithmetic of the frozen teacher's forward pass during distillation: ``fp32``, ``bf16``
            (autocast; the teacher forward is most of an SKT step and needs no gradients) or ``auto`` (bf16
            where the device has native bf16, see :func:`vkd.engine.native_bf16`, else fp32). The student
            and the losses stay in ``train.mixed_precision``; evaluation of the teacher is always fp32.
    """

    run: str = ""
    width_div: int = 1
    precision: Literal["fp32", "bf16", "auto"] = "auto"


@dataclass
class SKTTrainConfig(TrainConfig):
    """Training defaults of ``skt-teacher``, sized for the embedded default on a 2-core CPU.

    Adam with weight decay 5e-4 as the reference, but lr 5e-4 with 30 warm-up steps, a cosine decay and
    gradient clipping, because a few hundred steps from random init are all a CPU budget allows (the
    reference recipe lives in the real-data presets: SGD lr 1e-7 for the teacher, Adam lr 1e-4 for SKT).
    """

    steps: int = 600
    batch_size: int = 4
    lr: float = 5e-4
    weight_decay: float = 5e-4
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    fused_optimizer: bool = True
    scheduler: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 30
    grad_clip: float = 10.0
    log_every: int = 25
    checkpoint_every: int = 1000
    keep_last: int = 1


@dataclass
class SKTStudentTrainConfig(SKTTrainConfig):
    """Training defaults of ``skt`` on the embedded default: AdamW (decoupled weight decay, which stays
    negligible when ``loss.reduction=mean`` makes the gradients small), 800 steps, lr 1.5e-3 (the 1/4
    student is small; on the embedded default 1.5e-3 gave SKT MAE 7.77 vs 8.15 at 5e-4, one run each)."""

    steps: int = 800
    lr: float = 1.5e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"


@dataclass
class SKTTeacherConfig(TaskConfig):
    """``vkd distill skt-teacher``: train a CSRNet (any width) on ground-truth densities."""

    task: str = "skt-teacher"
    train: SKTTrainConfig = field(default_factory=SKTTrainConfig)
    model: CSRNetConfig = field(default_factory=CSRNetConfig)
    data: CrowdDataConfig = field(default_factory=CrowdDataConfig)
    eval: CrowdEvalConfig = field(default_factory=CrowdEvalConfig)


@dataclass
class SKTConfig(TaskConfig):
    """``vkd distill skt``: a 1/n CSRNet student trained with structured knowledge transfer from a frozen teacher."""

    task: str = "skt"
    train: SKTStudentTrainConfig = field(default_factory=SKTStudentTrainConfig)
    teacher: TeacherRefConfig = field(default_factory=TeacherRefConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: SKTLossConfig = field(default_factory=SKTLossConfig)
    data: CrowdDataConfig = field(default_factory=CrowdDataConfig)
    eval: CrowdEvalConfig = field(default_factory=CrowdEvalConfig)
