"""`seqvision train`: one process or many (torchrun), resumable to the bit, nothing lost on failure."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import create_model
from .checkpoint import latest_checkpoint, locked, read_checkpoint, resolve_weights, save_checkpoint
from .config import TrainConfig, resume_differences, run_folder, saved_config
from .data import DataError, Seeded, build_datasets, build_transform, held_out
from .engine import NonFiniteLoss, evaluate, make_optimizer, optimizer_step, seed_step, train_micro_step
from .errors import ConfigError, require
from .weights import atomic_write, load_model, load_state_dict, load_weights, save_model


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(process_group_backend(device.type))
    return rank, world, device


def process_group_backend(device_type: str) -> str:
    """One process group for both devices on GPUs: NCCL for the gradients, gloo for the CPU tensors that
    evaluation sums (its confusion matrix and counts)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def make_deterministic() -> None:
    """Deterministic kernels everywhere: cuBLAS needs a fixed workspace (set before its first use), cuDNN
    its deterministic algorithms and no autotuning."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def make_loader(ds, batch: int, workers: int, batches=None) -> DataLoader:
    """In-order batches of `batch`, or exactly the index lists in `batches`."""
    kw = dict(num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available())
    if batches is not None:
        return DataLoader(ds, batch_sampler=batches, **kw)
    return DataLoader(ds, batch_size=batch, **kw)


def epoch_batches(sampler: DistributedSampler, epoch: int, micro: int) -> list[list[int]]:
    """This process's micro-batches of an epoch (full batches only, so every step is the same size)."""
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + micro] for i in range(0, len(idx) - micro + 1, micro)]


@dataclass
class Run:
    """A training run between steps: what `build` made, and the counters a checkpoint keeps."""
    cfg: TrainConfig
    folder: Path
    rank: int
    world: int
    device: torch.device
    classes: list[str]
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP wrapper
    ema: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    mixup: Any
    criterion: Any
    train_ds: Seeded
    sampler: DistributedSampler
    val_loader: DataLoader
    test_loader: DataLoader | None
    micro: int
    steps_per_epoch: int
    total_steps: int
    meta: dict[str, str]  # written into every weights file: classes, data settings, split
    resume_from: Path | None
    step: int = 0
    history: list = field(default_factory=list)
    best: float = -1.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def evaluated(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model


def check_run_folder(cfg: TrainConfig, folder: Path) -> Path | None:
    """The checkpoint to resume from; refuses to write over a run, or to resume one with other settings."""
    held = sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []
    if held and not cfg.resume:
        raise FileExistsError(f"{folder} already holds files ({', '.join(held[:6])}{' ...' if len(held) > 6 else ''})"
                              f"; pass --resume to continue its run or choose another --output")
    saved = saved_config(folder)
    if cfg.resume and saved is not None:
        changed = resume_differences(cfg, saved)
        if changed:
            raise ConfigError(f"{folder}: --resume cannot change {changed}; start a new --output instead")
    return latest_checkpoint(folder) if folder.exists() else None


def build_model(cfg: TrainConfig, classes: list[str]) -> torch.nn.Module:
    """The model to train: fresh, or from --pretrained weights (head re-initialised for other classes, stem
    adapted to other channels, a ViT's position grid resampled), its backbone frozen for linear probing."""
    model = create_model(cfg.model, num_classes=len(classes), drop_path_rate=cfg.drop_path)
    if cfg.pretrained:
        load_weights(model, resolve_weights(cfg.pretrained), drop_head=True, adapt_in_chans=True, classes=classes)
    if cfg.freeze_backbone:
        head = set(map(id, model.get_classifier().parameters()))
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    return model


def build(cfg: TrainConfig) -> Run:
    """Data, model, optimizer, schedule and loaders of a run, from its config alone."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.scheduler import create_scheduler_v2

    if cfg.tensorboard:
        require("tensorboard", "tensorboard")  # before anything is written
    if cfg.deterministic:
        make_deterministic()
    rank, world, device = setup_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    folder = run_folder(cfg)
    resume_from = check_run_folder(cfg, folder)
    spec = build_datasets(cfg.data, cfg.val_fraction, cfg.seed, cfg.skip_corrupt, cfg.data_root or None, cfg.classes)
    if cfg.train_fraction < 1:  # the validation and test splits stay whole
        spec.train = held_out(spec.train, 1 - cfg.train_fraction, cfg.seed)[0]
    if resume_from is not None:
        meta = json.loads((folder / "run.json").read_text())
        if meta["classes"] != spec.classes:
            raise DataError(f"{folder}: the checkpoint's classes {meta['classes']} disagree with the data's "
                            f"{spec.classes} ({cfg.data})")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, spec.classes).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    if cfg.batch_size % (world * cfg.accum_steps):
        raise ConfigError(f"--batch-size {cfg.batch_size} must divide by processes x accumulation steps "
                          f"({world} x {cfg.accum_steps})")
    micro = cfg.batch_size // (world * cfg.accum_steps)
    img_size = cfg.img_size or model.cfg.img_size[0]
    tf_args = dict(img_size=img_size, in_chans=model.cfg.in_chans, mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct)
    train_ds = Seeded(spec.train, build_transform(True, randaugment=cfg.randaugment, re_prob=cfg.re_prob,
                                                crop_pad=cfg.crop_pad, hflip=cfg.hflip, **tf_args), cfg.seed)
    eval_tf = build_transform(False, **tf_args)
    if cfg.select_on == "test" and spec.test is None:
        raise ConfigError(f"--select-on test: {cfg.data} has no test split")
    # Every process evaluates its own stride of a split; counts are summed, none padded.
    strided = lambda ds: make_loader(Subset(Seeded(ds, eval_tf, cfg.seed), range(rank, len(ds), world)),  # noqa: E731
                                     micro * 2, cfg.workers)
    val_loader = strided(spec.test if cfg.select_on == "test" else spec.val)
    test_loader = strided(spec.test) if spec.test is not None else None
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(epoch_batches(sampler, 0, micro)) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.data}: {len(spec.train)} training images make no full batch of {cfg.batch_size}")
    total = cfg.epochs * steps_per_epoch
    total = min(cfg.max_steps, total) if cfg.max_steps > 0 else total

    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=cfg.epochs - cfg.cooldown_epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=False,
                                       updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" and device.type == "cuda" else None
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=cfg.mixup_switch_prob,
                      label_smoothing=cfg.smoothing, num_classes=len(spec.classes))
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(cfg.smoothing)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.ema_decay)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    split = {"data": cfg.data, "val_fraction": cfg.val_fraction, "seed": cfg.seed, "select_on": cfg.select_on,
             "classes": cfg.classes}
    meta = {"classes": json.dumps(spec.classes), "data": json.dumps({**tf_args, "mean": cfg.mean, "std": cfg.std}),
            "split": json.dumps(split)}
    return Run(cfg, folder, rank, world, device, spec.classes, model, net, ema, optimizer, scheduler, scaler, mixup,
               criterion, train_ds, sampler, val_loader, test_loader, micro, steps_per_epoch, total, meta,
               resume_from)


def restore(run: Run) -> None:
    """Load the latest checkpoint into a resumed run, or record a new run's settings in run.json."""
    if run.resume_from is not None:
        stem, sd, ema_sd, state = read_checkpoint(run.folder, ema=run.ema is not None)
        load_state_dict(run.model, sd, source=f"{stem}.safetensors")
        if run.ema is not None:
            load_state_dict(run.ema.module, ema_sd, source=f"{stem}.ema.safetensors")
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.step, run.history, run.best = state["step"], state["history"], state["best"]
        if run.main:
            print(f"resumed {run.folder} at step {run.step} (epoch {run.step // run.steps_per_epoch})")
    elif run.main:
        run.folder.mkdir(parents=True, exist_ok=True)
        record = {"train": dataclasses.asdict(run.cfg), "classes": run.classes,
                  "model_config": dataclasses.asdict(run.model.cfg)}
        atomic_write(run.folder / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def checkpoint(run: Run) -> None:
    if run.main:
        state = {"step": run.step, "history": run.history, "best": run.best, "optimizer": run.optimizer.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler is not None else {}}
        save_checkpoint(run.folder, run.step, run.model, run.ema.module if run.ema else None, state, run.meta,
                        run.cfg.keep_ckpts)
    if run.world > 1:
        dist.barrier()


def train_step(run: Run, loader, epoch: int) -> tuple[float, int]:
    """One optimizer step over `accum_steps` micro-batches; returns (mean loss, images seen by all processes)."""
    cfg = run.cfg
    run.scheduler.step_update(run.step)  # set lr
    loss, seen = 0.0, 0
    for m in range(cfg.accum_steps):
        images, targets = next(loader)
        seed_step(cfg.seed, run.step, m, run.rank)
        sync = m == cfg.accum_steps - 1 or run.world == 1
        with run.net.no_sync() if not sync else nullcontext():
            value = train_micro_step(run.net, images, targets, run.criterion, run.mixup, run.device, cfg.amp,
                                     1.0 / cfg.accum_steps, run.scaler)
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss is {value} at step {run.step + 1} (epoch {epoch + 1}); stopped without "
                                f"writing a checkpoint, the last good one in {run.folder} is kept")
        loss += value / cfg.accum_steps
        seen += len(images) * run.world
    optimizer_step(run.net, run.optimizer, cfg.clip_grad, run.scaler, run.step + 1)
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)
    run.step += 1
    return loss, seen


def train_epoch(run: Run, progress) -> float:
    """Optimizer steps up to the end of the current epoch (or the step budget); returns the mean loss."""
    cfg = run.cfg
    epoch, start = divmod(run.step, run.steps_per_epoch)
    batches = epoch_batches(run.sampler, epoch, run.micro)[start * cfg.accum_steps: run.steps_per_epoch * cfg.accum_steps]
    run.train_ds.epoch = epoch
    loader = iter(make_loader(run.train_ds, run.micro, cfg.workers, batches=batches))
    run.net.train()
    seen, t0, loss_sum, steps = 0, time.perf_counter(), 0.0, 0
    # `with`: the bar is closed before an error is printed, so the error stays the last line
    with progress(total=run.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}") as bar:
        while run.step < min(run.total_steps, (epoch + 1) * run.steps_per_epoch):
            loss, n = train_step(run, loader, epoch)
            seen, steps, loss_sum = seen + n, steps + 1, loss_sum + loss
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            bar.update()
            if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step % run.steps_per_epoch:
                checkpoint(run)
    run.history.append({"epoch": epoch + 1, "step": run.step, "train_loss": loss_sum / max(steps, 1),
                        "epoch_seconds": time.perf_counter() - t0})
    return loss_sum / max(steps, 1)


def end_of_epoch(run: Run, writer=None) -> None:
    """Score the selection split, keep the best weights, write the metrics, checkpoint."""
    metrics = evaluate(run.evaluated, run.val_loader, run.device, len(run.classes), run.cfg.amp)
    h = run.history[-1]
    h.update(val_loss=metrics["loss"], top1=metrics["top1"], top5=metrics["top5"],
             lr=run.optimizer.param_groups[0]["lr"])
    if run.main:
        split = "test (--select-on test)" if run.cfg.select_on == "test" else "val"
        print(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f}  {split} loss {metrics['loss']:.4f}  "
              f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%")
        if metrics["top1"] > run.best:  # before the checkpoint that records it as the best
            run.best = metrics["top1"]
            save_model(run.evaluated, run.folder / "best.safetensors", {**run.meta, "epoch": str(h["epoch"])})
    checkpoint(run)
    if run.main:  # after it: the metrics are never ahead of the checkpoint a resume starts from
        _write_metrics(run.folder, run.history, metrics, run.classes)
        if writer is not None:
            for k in ("train_loss", "val_loss", "top1", "top5", "lr"):
                writer.add_scalar(k, h[k], run.step)


def score_test(run: Run) -> dict | None:
    """The test split, scored once at the end with the selected weights (best.safetensors); None without one."""
    if run.test_loader is None or run.step < run.total_steps:
        return None
    if (run.folder / "test.json").exists():
        scored = json.loads((run.folder / "test.json").read_text())
        if scored.get("step") == run.step:  # a finished run resumed again: report, don't score anew
            return scored
    model = load_model(run.folder / "best.safetensors").to(run.device) if (run.folder / "best.safetensors").exists() \
        else run.evaluated
    metrics = evaluate(model, run.test_loader, run.device, len(run.classes), run.cfg.amp)
    if run.main:
        best = max(run.history, key=lambda h: h["top1"]) if run.history else {}
        record = {**metrics, "classes": run.classes, "step": run.step, "selected_epoch": best.get("epoch"),
                  "selected_on": run.cfg.select_on, "val_top1": best.get("top1")}
        atomic_write(run.folder / "test.json", lambda tmp: Path(tmp).write_text(json.dumps(record)))
        print(f"test (once, epoch {best.get('epoch')} weights chosen on {run.cfg.select_on}): "
              f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['count']} images)")
    return metrics


def train(cfg: TrainConfig) -> dict:
    """Train `cfg.model` on `cfg.data`; returns the last epoch's metrics, with "test" where a test split
    was scored. See TrainConfig for every option."""
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun's; the run folder is the first process's
    with locked(run_folder(cfg)) if main else nullcontext():  # before anything in it is read or written
        run = build(cfg)
        restore(run)
        progress = _progress(run.main)
        writer = _tensorboard(run.folder) if cfg.tensorboard and run.main else None
        while run.step < run.total_steps:
            train_epoch(run, progress)
            if run.step % run.steps_per_epoch == 0 or run.step == run.total_steps:
                end_of_epoch(run, writer)
        test = score_test(run)
        if run.main and run.step >= run.total_steps:
            write_hub(run)
    if run.world > 1:
        dist.destroy_process_group()
    result = dict(run.history[-1]) if run.history else {}
    if test is not None:
        result["test"] = {k: test[k] for k in ("top1", "top5", "loss", "count")}
    return result


def write_hub(run: Run) -> None:
    """The best weights as a hub folder (timm's layout) in RUN/hub, with class names and preprocessing."""
    from .hub import save_pretrained

    best = run.folder / "best.safetensors"
    model = load_model(best) if best.exists() else run.evaluated
    save_pretrained(model, run.folder / "hub", run.classes, json.loads(run.meta["data"]))


def _write_metrics(run: Path, history: list[dict], last: dict, classes: list[str]) -> None:
    import csv

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)

    atomic_write(run / "metrics.csv", write_csv)
    atomic_write(run / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(history, indent=1)))
    atomic_write(run / "val_last.json", lambda tmp: Path(tmp).write_text(json.dumps({**last, "classes": classes})))


def _tensorboard(run: Path):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(run / "tb")


def _progress(enabled: bool):
    from tqdm import tqdm
    return lambda **kw: tqdm(disable=not enabled, dynamic_ncols=True, mininterval=1.0, **kw)
