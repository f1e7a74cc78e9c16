"""Settings and presets of the few-shot experiment (Franceschi et al. 2018, section 5.2)."""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from pydantic import Field, model_validator

from ..config import MEMORY_HELP, ExperimentConfig

# Classes per part of each split, and examples per class: what a config can ask for is checked
# against these before any data is read.
CLASSES = {
    ("omniglot", "paper"): {"train": 4800, "val": 400, "test": 1292},
    ("omniglot", "vinyals"): {"train": 4112, "val": 688, "test": 1692},
    ("miniimagenet", "ravi"): {"train": 48, "val": 16, "test": 20},  # 48: val/ may be absent
}
EXAMPLES = {"omniglot": 20, "miniimagenet": 600}
IMAGES = {"omniglot": (1, 28), "miniimagenet": (3, 84)}  # channels, side

# Settings that change neither the training trajectory nor its checkpoints: a run may be
# resumed with a larger budget, and tested with other test settings. (Meta-validation has its
# own batch-norm mode, val_batch_norm, which is hashed: it decides which network is best.pt
# and when training stops early.) The throughput settings (speed.py) change no number beyond
# float32 rounding, so they are test settings too; network_precision="bf16" changes
# the numbers and is hashed.
SPEED_KEYS = frozenset({"memory_format", "fused_blocks", "episodes_on_device"})
TEST_KEYS = SPEED_KEYS | frozenset(
    {"test_classes", "test_episodes", "test_steps", "test_batch_norm", "test_seed", "device"}
)
NOT_HASHED = TEST_KEYS | {"iterations", "checkpoint_every"}
# Settings added after runs were checkpointed, with the value that means "not used": at that
# value they are left out of a checkpoint's identity, so the earlier runs still load.
ADDED_LATER = {"init_from": None, "feature_norm": None, "network_precision": "fp32"}
# Episode settings a test may change: a representation trained on 5-way episodes tested on
# 20-way ones, or a classical network on every cell.
EPISODE_KEYS = frozenset({"ways", "shots", "queries"})
# How an episode's images meet batch norm outside training (learners._episode_features).
BatchNormMode = Literal["transductive", "separate", "running"]
BATCH_NORM_MODES = get_args(BatchNormMode)
_BATCH_NORM_HELP = (
    "transductive: each episode's support+query images form one batch-norm batch (its own "
    "statistics; as train_batch_norm=episode trains); separate: the support images one batch, "
    "the query images another (as the paper's code and MAML's do, in training too); running: "
    "the running statistics of meta-training, each image on its own (inductive)"
)


class FewshotConfig(ExperimentConfig):
    # the parts of the split whose classes must hold `ways` classes: training meta-trains and
    # meta-validates, and its episodes are tested later
    PARTS: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    PRESET_SUMMARIES: ClassVar[dict[str, str]] = {}  # filled below, beside PRESETS

    dataset: Literal["omniglot", "miniimagenet"] = Field("omniglot", description="data set")
    split: Literal["paper", "vinyals", "ravi"] = Field(
        "paper",
        description="which classes train, validate and test: the paper's Omniglot split, "
        "Vinyals et al.'s Omniglot split, or Ravi and Larochelle's mini-ImageNet split",
    )
    split_seed: int = Field(
        0,
        ge=0,
        description="seed that draws the paper's Omniglot split, and the validation classes "
        "held out where a split has none",
    )
    train_classes: int | None = Field(
        None, gt=0, description="meta-train on the first this many classes only (none: all)"
    )
    val_classes: int | None = Field(
        None, gt=0, description="meta-validate on the first this many classes only (none: all)"
    )
    test_classes: int | None = Field(
        None, gt=0, description="meta-test on the first this many classes only (none: all)"
    )
    model: Literal["omniglot-conv", "miniimagenet-conv", "resnet-paper", "resnet12"] = Field(
        "omniglot-conv",
        description="the representation network: the paper's 4-layer convolutional networks "
        "for Omniglot or mini-ImageNet, the paper's residual network, or ResNet-12",
    )
    width: float = Field(
        1.0, gt=0, description="multiplies every layer's number of filters (1: the paper's)"
    )
    init_from: str | None = Field(
        None,
        description="a training run directory (bilevel or classical) whose network (best.pt) "
        "initialises this one: pretraining, then bilevel fine-tuning",
    )
    feature_norm: float | None = Field(
        None,
        gt=0,
        description="rescale every feature vector to this length, so that a fixed inner_lr "
        "takes steps of the same effective size whatever the network learns "
        "(docs/experiments.md); none: the paper's network, unscaled",
    )
    ways: int = Field(5, gt=0, description="classes per episode (5-way: 5)")
    shots: int = Field(1, gt=0, description="training (support) examples per class and episode")
    queries: int = Field(
        15, gt=0, description="test (query) examples per class and episode, that score the head"
    )
    meta_batch: int = Field(4, gt=0, description="episodes per meta-iteration")
    inner_steps: int = Field(
        5, gt=0, description="gradient steps that fit each episode's linear classifier (head)"
    )
    inner_lr: float = Field(
        0.1, gt=0, description="learning rate of those steps (the starting value if learned)"
    )
    learn_inner_lr: bool = Field(
        False, description="learn inner_lr together with the network (as its logarithm)"
    )
    train_batch_norm: Literal["episode", "meta-batch"] = Field(
        "episode",
        description="batch normalisation in meta-training. episode: the images of each "
        "episode are normalised by their own statistics (as transductive testing does; a "
        "meta-batch split over processes gives the same numbers); meta-batch: by those of the "
        "whole meta-batch (one process only)",
    )
    memory: Literal["graph", "trajectory", "checkpoint"] = Field("graph", description=MEMORY_HELP)
    outer_lr: float = Field(1e-3, gt=0, description="learning rate of Adam on the network")
    lr_decay: float = Field(
        1e-5,
        ge=0,
        description="decay of outer_lr: at iteration t it is outer_lr / (1 + lr_decay * t)",
    )
    iterations: int = Field(100_000, gt=0, description="meta-iterations to run at most")
    classical_batch: int | None = Field(
        None,
        gt=0,
        description="images per step of `fewshot classical` (none: as many as a meta-batch has)",
    )
    log_every: int = Field(10, gt=0, description="iterations per line of metrics.jsonl")
    validate_every: int = Field(1000, gt=0, description="iterations between meta-validations")
    checkpoint_every: int | None = Field(
        None, gt=0, description="iterations between checkpoints (none: at each validation)"
    )
    val_episodes: int = Field(
        200, gt=0, description="meta-validation episodes (the same, seeded, at each validation)"
    )
    patience: int = Field(
        20, gt=0, description="stop after this many validations without improvement"
    )
    test_episodes: int = Field(600, gt=0, description="meta-test episodes")
    test_steps: list[int] = Field(
        [1, 3, 5, 10, 20],
        min_length=1,
        description="the numbers of inner steps to test with (inner_steps is added)",
    )
    val_batch_norm: BatchNormMode = Field(
        "transductive", description=f"batch norm at meta-validation. {_BATCH_NORM_HELP}"
    )
    test_batch_norm: BatchNormMode = Field(
        "transductive",
        description=f"batch norm at meta-test (a test setting: any trained run takes any mode). "
        f"{_BATCH_NORM_HELP}",
    )
    test_seed: int = Field(1, ge=0, description="seed that draws the meta-test episodes")
    # throughput (speed.py; measured in docs/experiments.md, "Throughput")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="how the network's activations are laid out in memory: channels_last "
        "(faster on a CPU) or contiguous; auto: channels_last on a CPU, contiguous on a GPU. "
        "Results agree up to float32 rounding",
    )
    fused_blocks: bool = Field(
        True,
        description="compute batch norm in one fused step and max-pool before the activation "
        "(they commute): the same results up to float32 rounding, several times faster on a "
        "CPU; false: the plain formulation",
    )
    network_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: run the network in bfloat16 (GPUs with tensor cores, CPUs with "
        "AVX512-BF16), the heads, their inner steps and the hypergradient staying float32. It "
        "changes the results, so a run keeps the precision it was trained with",
    )
    episodes_on_device: bool | None = Field(
        None,
        description="keep each image split on the device as 8-bit pixels and draw each "
        "meta-batch there (the same episodes as drawn on the host); default: on a GPU only",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if (self.dataset == "miniimagenet") != (self.split == "ravi"):
            raise ValueError("split 'ravi' is mini-ImageNet's, 'paper'/'vinyals' Omniglot's")
        available = self.classes_available()
        for part in self.PARTS:
            if self.ways > available[part]:
                raise ValueError(
                    f"ways={self.ways} exceeds the {available[part]} {part} classes available"
                )
        if self.shots + self.queries > EXAMPLES[self.dataset]:
            raise ValueError(
                f"shots + queries = {self.shots + self.queries} exceeds the "
                f"{EXAMPLES[self.dataset]} examples per class of {self.dataset}"
            )
        if any(t < 1 for t in self.test_steps):
            raise ValueError("test_steps must all be positive")
        return self

    def classes_available(self) -> dict[str, int]:
        sizes = CLASSES[self.dataset, self.split]
        limits = {"train": self.train_classes, "val": self.val_classes, "test": self.test_classes}
        return {p: min(n, limits[p] or n) for p, n in sizes.items()}

    def hashed(self) -> dict:
        """The settings a checkpoint must agree with to be resumed or tested (settings added
        later leave the identity of runs that do not use them unchanged)."""
        settings = self.model_dump()
        return {
            k: v
            for k, v in settings.items()
            if k not in NOT_HASHED and not (k in ADDED_LATER and v == ADDED_LATER[k])
        }


class FewshotTestConfig(FewshotConfig):
    """The settings of a meta-test: its episodes come from the test classes alone, and only the
    test and episode settings may differ from the trained run's."""

    PARTS: ClassVar[tuple[str, ...]] = ("test",)
    SETTABLE: ClassVar[frozenset[str] | None] = TEST_KEYS | EPISODE_KEYS


def _preset(dataset: str, ways: int, shots: int) -> dict:
    if dataset == "omniglot":
        return {
            "dataset": "omniglot",
            "split": "paper",
            "model": "omniglot-conv",
            "ways": ways,
            "shots": shots,
        }
    return {
        "dataset": "miniimagenet",
        "split": "ravi",
        "model": "miniimagenet-conv",
        "ways": ways,
        "shots": shots,
    }


PRESETS = {
    f"{d}-{n}w{k}s": _preset(d, n, k)
    for d, n, k in (
        ("omniglot", 5, 1),
        ("omniglot", 5, 5),
        ("omniglot", 20, 1),
        ("omniglot", 20, 5),
        ("miniimagenet", 5, 1),
        ("miniimagenet", 5, 5),
    )
}
for _shots in (1, 5):  # the residual representations on mini-ImageNet
    PRESETS[f"miniimagenet-5w{_shots}s-resnet"] = {
        **PRESETS[f"miniimagenet-5w{_shots}s"],
        "model": "resnet-paper",
    }
    PRESETS[f"miniimagenet-5w{_shots}s-resnet12"] = {
        **PRESETS[f"miniimagenet-5w{_shots}s"],
        "model": "resnet12",
    }
# The recipe that matched the paper (or came within its confidence interval: 5w1s) in every
# Omniglot cell on a GPU (docs/experiments.md): 20-way 1-shot episodes, 16 per meta-batch, a
# lower outer learning rate (with the paper's 1e-3, 20-way validation peaks at about 1,000
# iterations, then declines), validated often; tested with --set ways=/shots=.
PRESETS["omniglot-20w1s-mb16"] = {
    **PRESETS["omniglot-20w1s"],
    "meta_batch": 16,
    "outer_lr": 3e-4,
    "validate_every": 250,
}
PRESETS["quick"] = {
    **PRESETS["omniglot-5w1s"],
    "iterations": 600,
    "log_every": 10,
    "validate_every": 200,
    "val_episodes": 100,
    "patience": 5,
    "test_episodes": 200,
}

NAMES = {"omniglot": "Omniglot", "miniimagenet": "mini-ImageNet"}
NETWORKS = {
    "omniglot-conv": "the paper's 4-layer convolutional network",
    "miniimagenet-conv": "the paper's 4-layer convolutional network",
    "resnet-paper": "the paper's residual network",
    "resnet12": "ResNet-12",
}


def _summary(settings: dict) -> str:
    """One line on a paper preset: its data set, episodes and network."""
    cell = f"{settings['ways']}-way {settings['shots']}-shot episodes"
    return f"{NAMES[settings['dataset']]}, {cell}, {NETWORKS[settings['model']]}"


FewshotConfig.PRESET_SUMMARIES.update({name: _summary(preset) for name, preset in PRESETS.items()})
FewshotConfig.PRESET_SUMMARIES["omniglot-20w1s-mb16"] = (
    "Omniglot, 20-way 1-shot episodes, 16 a meta-batch, outer_lr 3e-4: the recipe that matched "
    "the paper in every Omniglot cell (test each with --set ways=... --set shots=...)"
)
FewshotConfig.PRESET_SUMMARIES["quick"] = (
    "Omniglot, 5-way 1-shot episodes, 600 iterations: minutes on 2 CPU cores"
)
