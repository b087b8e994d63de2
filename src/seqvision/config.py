"""Typed run configuration: a dataclass, recipes (YAML) over its defaults, and a CLI generated from it."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .fields import checked_values

RECIPES = Path(__file__).parent / "recipes"
NEEDS_WEIGHTS = ("finetune392", "transfer")  # recipes that start from trained weights
# What a resumed run may change: where things are and how the work is done, not what is computed.
RESUMABLE = ("output", "resume", "data_root", "workers", "threads", "ckpt_every", "keep_ckpts", "max_steps",
             "tensorboard", "skip_corrupt")


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs. The defaults are the `small` recipe (the main job's, measured on
    Fashion-MNIST), except `model` and `workers`; recipes and flags override."""
    data: str = opt("fashion-mnist", "fashion-mnist, mnist-5k, cifar10, cifar100, a folder with train/ and val/, "
                                     "or one class-folder tree (split by --val-fraction)")
    model: str = opt("sequencer2d_1m_28", "registered model name (seqvision models)")
    config: str = opt("", "recipe: a bundled name (small, imagenet, finetune392, transfer) or a YAML path")
    output: str = opt("", "run folder (default runs/MODEL-DATA)")
    resume: bool = opt(False, "continue the run in --output from its latest checkpoint, with its own settings")
    pretrained: str = opt("", "start from these weights: a run folder or a weights file (seqvision, timm or "
                              "the authors' keys); the head is re-initialised when the classes differ")
    freeze_backbone: bool = opt(False, "train the classifier only (linear probing; needs --pretrained)")
    data_root: str = opt("", "where a named dataset's files are (default: its usual place)")
    epochs: int = opt(10, "training epochs, cooldown included")
    batch_size: int = opt(128, "global batch per optimizer step (all processes, all accumulation steps)")
    accum_steps: int = opt(1, "gradient accumulation steps per optimizer step")
    lr: float = opt(2e-3, "peak learning rate")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms or other 1-D params)")
    warmup_epochs: float = opt(0.3, "linear warm-up from --warmup-lr")
    warmup_lr: float = opt(1e-6, "learning rate at the start of warm-up")
    min_lr: float = opt(1e-5, "floor of the cosine schedule")
    cooldown_epochs: int = opt(0, "epochs at --min-lr after the cosine decay")
    img_size: int = opt(0, "input side (0: the model's default)")
    val_fraction: float = opt(0.1, "share of the training data held out for validation (curves, model selection)")
    classes: str = opt("", "train and evaluate on these classes only: comma-separated names or indices ('' all)")
    train_fraction: float = opt(1.0, "train on this seeded share of the training split (data-efficiency studies)")
    select_on: str = opt("val", "split that picks best.safetensors: val, or test (opt-in; makes the test figure "
                                "optimistic)")
    mean: tuple[float, ...] = opt((0.485, 0.456, 0.406), "normalisation mean per channel")
    std: tuple[float, ...] = opt((0.229, 0.224, 0.225), "normalisation std per channel")
    crop_pct: float = opt(0.875, "eval centre-crop fraction (large images)")
    randaugment: str = opt("", "RandAugment policy, e.g. rand-m9-mstd0.5-inc1 ('' off)")
    crop_pad: int = opt(0, "small images: pixels of padding for the random crop (-1: a side/8, 0: no crop)")
    hflip: float = opt(0.5, "horizontal-flip probability")
    mixup: float = opt(0.0, "mixup alpha (0 off)")
    cutmix: float = opt(0.0, "cutmix alpha (0 off)")
    mixup_switch_prob: float = opt(0.5, "chance of cutmix over mixup when both are on")
    smoothing: float = opt(0.1, "label smoothing")
    re_prob: float = opt(0.0, "random-erasing probability")
    drop_path: float = opt(0.0, "stochastic depth at the last block (linear ramp)")
    clip_grad: float = opt(1.0, "gradient-norm clip (0 off)")
    ema_decay: float = opt(0.0, "EMA of the weights (0 off); the EMA is evaluated and saved beside the model")
    amp: str = opt("", "autocast dtype: bf16 or fp16 ('' fp32; fp16 only on GPU)")
    channels_last: bool = opt(True, "channels-last memory format on GPU")
    workers: int = opt(2, "data-loading worker processes")
    seed: int = opt(0, "seed of data order, augmentation, init and the val split")
    deterministic: bool = opt(False, "deterministic kernels (bit-exact resume on the same machine)")
    ckpt_every: int = opt(0, "also checkpoint every N optimizer steps (0: at epoch ends only)")
    keep_ckpts: int = opt(2, "checkpoints kept in the run folder")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: run all epochs)")
    skip_corrupt: bool = opt(False, "skip unreadable images instead of stopping")
    tensorboard: bool = opt(False, "also log to TensorBoard in the run folder")
    threads: int = opt(0, "CPU threads per process (0: torch's default)")

    def __post_init__(self):
        values = checked_values(type(self), dataclasses.asdict(self), lambda k: f"--{flag(k)}")
        for k, v in values.items():
            setattr(self, k, v)
        for name, (lo, hi, lo_open, hi_open) in RANGES.items():
            v = getattr(self, name)
            below = v < lo or (lo_open and v == lo)
            above = hi is not None and (v > hi or (hi_open and v == hi))
            if below or above:
                raise ConfigError(f"--{flag(name)} must be {describe(lo, hi, lo_open, hi_open)}, got {v}")
        if self.cooldown_epochs >= self.epochs:
            raise ConfigError(f"--cooldown-epochs must be below --epochs ({self.epochs}), got {self.cooldown_epochs}")
        if self.warmup_epochs > self.epochs - self.cooldown_epochs:
            raise ConfigError(f"--warmup-epochs must be at most the epochs before cool-down "
                              f"({self.epochs - self.cooldown_epochs}), got {self.warmup_epochs}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr must be at most --lr ({self.lr}), got {self.min_lr}")
        if len(self.mean) != len(self.std) or not 1 <= len(self.mean) <= 4:
            raise ConfigError(f"--mean and --std need one value per channel (1 to 4, as many of each), got "
                              f"{len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"--std values must be positive, got {self.std}")
        if self.amp not in ("", "bf16", "fp16"):
            raise ConfigError(f"--amp must be bf16, fp16 or empty, got {self.amp!r}")
        if self.select_on not in ("val", "test"):
            raise ConfigError(f"--select-on must be val or test, got {self.select_on!r}")
        if self.randaugment:
            check_randaugment(self.randaugment)
        if Path(self.config).stem in NEEDS_WEIGHTS and not self.pretrained:
            raise ConfigError(f"the {Path(self.config).stem} recipe fine-tunes: pass --pretrained RUN_DIR_OR_FILE")
        if self.freeze_backbone and not self.pretrained:
            raise ConfigError("--freeze-backbone trains the classifier alone: pass --pretrained weights too")
        check_model_size(self.model, self.img_size)


# (low, high, low excluded, high excluded); high None: unbounded. Relations between options are checked apart.
RANGES = {
    "epochs": (1, None, False, False), "batch_size": (1, None, False, False), "accum_steps": (1, None, False, False),
    "lr": (0, None, True, False), "weight_decay": (0, None, False, False), "warmup_epochs": (0, None, False, False),
    "warmup_lr": (0, None, False, False), "min_lr": (0, None, False, False), "cooldown_epochs": (0, None, False, False),
    "img_size": (0, 4096, False, False), "val_fraction": (0, 1, True, True), "train_fraction": (0, 1, True, False),
    "crop_pct": (0, 1, True, False), "crop_pad": (-1, None, False, False), "hflip": (0, 1, False, False),
    "mixup": (0, None, False, False), "cutmix": (0, None, False, False), "mixup_switch_prob": (0, 1, False, False),
    "smoothing": (0, 1, False, True), "re_prob": (0, 1, False, False), "drop_path": (0, 1, False, True),
    "clip_grad": (0, None, False, False), "ema_decay": (0, 1, False, True), "workers": (0, 256, False, False),
    "seed": (0, 2**31 - 1, False, False), "ckpt_every": (0, None, False, False), "keep_ckpts": (1, None, False, False),
    "max_steps": (0, None, False, False), "threads": (0, 1024, False, False),
}


def flag(name: str) -> str:
    return name.replace("_", "-")


def describe(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'above' if lo_open else 'at least'} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_randaugment(policy: str) -> None:
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(policy, {})
    except Exception as e:  # timm raises AssertionError or ValueError on a malformed policy string
        raise ConfigError(f"--randaugment {policy!r} is not a RandAugment policy such as rand-m9-mstd0.5-inc1 "
                          f"({type(e).__name__}: {e})") from None


def check_model_size(model: str, img_size: int) -> None:
    """The model exists and takes `img_size` (a multiple of its stride; the one size of a fixed-grid model)."""
    from .registry import get_entry

    cfg = get_entry(model).config
    stride, fixed = getattr(cfg, "stride", 1), getattr(cfg, "fixed_size", False)
    if img_size and (img_size % stride or img_size < stride):
        raise ConfigError(f"--img-size must be a positive multiple of {model}'s stride {stride}, got {img_size}")
    if img_size and fixed and img_size != cfg.img_size[0]:
        raise ConfigError(f"--img-size: {model} takes only {cfg.img_size[0]} px (its token-mixing MLPs fix the "
                          f"grid), got {img_size}")


def load_recipe(name_or_path: str) -> dict:
    """A recipe's overrides: a bundled name (recipes/NAME.yaml) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise ConfigError(f"recipe {name_or_path!r} not found (bundled: {', '.join(names)})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of settings, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}")
    return values


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field (`batch_size` -> `--batch-size`), typed from the annotation, help from metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        kw = dict(default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} (default: {f.default!r})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=typing.get_args(kind)[0], nargs="+", metavar="X", **kw)
        else:
            parser.add_argument(flag, type=kind, **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Dataclass defaults, then the recipe named by --config, then the flags given on the command line.

    With --resume and an existing run folder, the run's own settings (run.json) replace the first two, so
    `--resume` alone continues the run as it was started; a flag that changes what the run computes is
    then refused by the training run itself (`resume_differences`).
    """
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    recipe = load_recipe(given["config"]) if given.get("config") else {}
    cfg = TrainConfig(**{**recipe, **given})
    saved = saved_config(run_folder(cfg)) if cfg.resume else None
    return cfg if saved is None else TrainConfig(**{**saved, **given})


def run_folder(cfg: TrainConfig) -> Path:
    data_name = Path(cfg.data).name or cfg.data
    return Path(cfg.output or f"runs/{cfg.model}-{data_name}")


def saved_config(run: Path) -> dict | None:
    """The settings a run folder was started with (its run.json), or None for a new folder."""
    path = run / "run.json"
    if not path.exists():
        return None
    import json

    try:
        saved = json.loads(path.read_text())["train"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a seqvision run record ({type(e).__name__}: {e})") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}


def resume_differences(cfg: TrainConfig, saved: dict) -> str:
    """The settings in which `cfg` differs from a run's saved ones, other than those a resume may change,
    as "--flag OLD -> NEW" items ('' when there are none)."""
    now = dataclasses.asdict(cfg)
    diffs = [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in saved
             if k not in RESUMABLE and saved[k] != now[k]]
    return ", ".join(diffs)
