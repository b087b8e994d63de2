"""Typed run configuration: a dataclass, recipes (YAML) over its defaults, and a CLI generated from it."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES = Path(__file__).parent / "recipes"


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the small-data recipe; recipes and flags override."""
    data: str = opt("fashion-mnist", "fashion-mnist, cifar10, cifar100, a folder with train/ and val/, "
                                     "or one class-folder tree (split by --val-fraction)")
    model: str = opt("sequencer2d_1m_28", "registered model name (seqvision models)")
    config: str = opt("", "recipe: a bundled name (small, imagenet, finetune392, transfer) or a YAML path")
    output: str = opt("", "run folder (default runs/MODEL-DATA)")
    resume: bool = opt(False, "continue the run in --output from its latest checkpoint")
    data_root: str = opt("", "where a named dataset's files are (default: its usual place)")
    epochs: int = opt(10, "training epochs, cooldown included")
    batch_size: int = opt(128, "global batch per optimizer step (all processes, all accumulation steps)")
    accum_steps: int = opt(1, "gradient accumulation steps per optimizer step")
    lr: float = opt(2e-3, "peak learning rate")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms or other 1-D params)")
    warmup_epochs: float = opt(1.0, "linear warm-up from --warmup-lr")
    warmup_lr: float = opt(1e-6, "learning rate at the start of warm-up")
    min_lr: float = opt(1e-6, "floor of the cosine schedule")
    cooldown_epochs: int = opt(0, "epochs at --min-lr after the cosine decay")
    img_size: int = opt(0, "input side (0: the model's default)")
    val_fraction: float = opt(0.1, "share of a single class-folder tree held out for validation")
    mean: tuple[float, ...] = opt((0.485, 0.456, 0.406), "normalisation mean per channel")
    std: tuple[float, ...] = opt((0.229, 0.224, 0.225), "normalisation std per channel")
    crop_pct: float = opt(0.875, "eval centre-crop fraction (large images)")
    randaugment: str = opt("", "RandAugment policy, e.g. rand-m9-mstd0.5-inc1 ('' off)")
    crop_pad: int = opt(-1, "small images: pixels of padding for the random crop (-1: a side/8, 0: no crop)")
    hflip: float = opt(0.5, "horizontal-flip probability")
    mixup: float = opt(0.0, "mixup alpha (0 off)")
    cutmix: float = opt(0.0, "cutmix alpha (0 off)")
    mixup_switch_prob: float = opt(0.5, "chance of cutmix over mixup when both are on")
    smoothing: float = opt(0.1, "label smoothing")
    re_prob: float = opt(0.0, "random-erasing probability")
    drop_path: float = opt(0.0, "stochastic depth at the last block (linear ramp)")
    clip_grad: float = opt(0.0, "gradient-norm clip (0 off)")
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
        if self.batch_size <= 0 or self.accum_steps <= 0 or self.epochs <= 0:
            raise ValueError(f"batch_size, accum_steps and epochs must be positive, got "
                             f"{self.batch_size}, {self.accum_steps}, {self.epochs}")
        if self.amp not in ("", "bf16", "fp16"):
            raise ValueError(f"--amp must be bf16, fp16 or empty, got {self.amp!r}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)


def load_recipe(name_or_path: str) -> dict:
    """A recipe's overrides: a bundled name (recipes/NAME.yaml) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise ValueError(f"recipe {name_or_path!r} not found (bundled: {', '.join(names)})")
    values = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
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
    """Dataclass defaults, then the recipe named by --config, then the flags given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    recipe = load_recipe(given["config"]) if given.get("config") else {}
    return TrainConfig(**{**recipe, **given})
