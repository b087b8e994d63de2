"""`seqvision train`: one process or many (torchrun), resumable to the bit, nothing lost on failure."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from . import create_model
from .checkpoint import latest_checkpoint, load_state, save_checkpoint
from .config import TrainConfig
from .data import Seeded, build_datasets, build_transform
from .engine import NonFiniteLoss, evaluate, optimizer_step, seed_step, train_micro_step
from .weights import load_weights, save_model


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


def run_folder(cfg: TrainConfig) -> Path:
    data_name = Path(cfg.data).name or cfg.data
    return Path(cfg.output or f"runs/{cfg.model}-{data_name}")


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


def train(cfg: TrainConfig) -> dict:
    """Train `cfg.model` on `cfg.data`; returns the final metrics. See TrainConfig for every option."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    if cfg.deterministic:
        make_deterministic()
    rank, world, device = setup_distributed()
    main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = run_folder(cfg)
    resume_from = latest_checkpoint(run) if run.exists() else None
    if resume_from is not None and not cfg.resume:
        raise FileExistsError(f"{run} already holds a run (latest: {resume_from.name}); pass --resume to continue "
                              f"it or choose another --output")

    spec = build_datasets(cfg.data, cfg.val_fraction, cfg.seed, cfg.skip_corrupt, cfg.data_root or None)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(spec.classes), drop_path_rate=cfg.drop_path)
    img_size = cfg.img_size or model.cfg.img_size[0]
    in_chans = model.cfg.in_chans
    if resume_from is not None:
        meta = json.loads((run / "run.json").read_text())
        if meta["classes"] != spec.classes:
            raise ValueError(f"{run}: the checkpoint's classes {meta['classes']} disagree with the data's "
                             f"{spec.classes} ({cfg.data})")
    model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    if cfg.batch_size % (world * cfg.accum_steps):
        raise ValueError(f"--batch-size {cfg.batch_size} must divide by processes x accumulation steps "
                         f"({world} x {cfg.accum_steps})")
    micro = cfg.batch_size // (world * cfg.accum_steps)
    tf_args = dict(img_size=img_size, in_chans=in_chans, mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct)
    train_ds = Seeded(spec.train, build_transform(True, randaugment=cfg.randaugment, re_prob=cfg.re_prob,
                                                crop_pad=cfg.crop_pad, hflip=cfg.hflip, **tf_args),
                      cfg.seed)
    val_ds = Seeded(spec.val, build_transform(False, **tf_args), cfg.seed)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(epoch_batches(sampler, 0, micro)) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(spec.train)} training images make no full batch of {cfg.batch_size}")
    # Every process evaluates its own stride of the validation set; counts are summed, none padded.
    val_loader = make_loader(torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world)), micro * 2, cfg.workers)

    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
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

    step, history, best = 0, [], -1.0
    if resume_from is not None:
        load_weights(model, f"{resume_from}.safetensors")
        if ema is not None:
            load_weights(ema.module, f"{resume_from}.ema.safetensors")
        state = load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, history, best = state["step"], state["history"], state["best"]
        if main:
            print(f"resumed {run} at step {step} (epoch {step // steps_per_epoch})")
    elif main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text(json.dumps({"train": dataclasses.asdict(cfg), "classes": spec.classes,
                                                   "model_config": dataclasses.asdict(model.cfg)}, indent=1))

    meta = {"classes": json.dumps(spec.classes), "data": json.dumps({**tf_args, "mean": cfg.mean, "std": cfg.std})}
    total_steps = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    writer = _tensorboard(run) if cfg.tensorboard and main else None

    def checkpoint():
        if main:
            state = {"step": step, "history": history, "best": best, "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else {}}
            save_checkpoint(run, step, model, ema.module if ema else None, state, meta, cfg.keep_ckpts)
        if world > 1:
            dist.barrier()

    progress = _progress(main)
    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        batches = epoch_batches(sampler, epoch, micro)[start * cfg.accum_steps: steps_per_epoch * cfg.accum_steps]
        train_ds.epoch = epoch
        loader = iter(make_loader(train_ds, micro, cfg.workers, batches=batches))
        bar = progress(total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        net.train()
        seen, t0, loss_sum = 0, time.perf_counter(), 0.0
        while step < min(total_steps, (epoch + 1) * steps_per_epoch):
            scheduler.step_update(step)  # set lr
            loss = 0.0
            for m in range(cfg.accum_steps):
                images, targets = next(loader)
                seed_step(cfg.seed, step, m, rank)
                sync = m == cfg.accum_steps - 1 or world == 1
                with net.no_sync() if not sync else nullcontext():
                    value = train_micro_step(net, images, targets, criterion, mixup, device, cfg.amp,
                                             1.0 / cfg.accum_steps, scaler)
                if not torch.isfinite(torch.tensor(value)):
                    raise NonFiniteLoss(f"loss is {value} at step {step + 1} (epoch {epoch + 1}); stopped without "
                                        f"writing a checkpoint, the last good one in {run} is kept")
                loss += value / cfg.accum_steps
                seen += len(images) * world
            optimizer_step(net, optimizer, cfg.clip_grad, scaler)  # step
            if ema is not None:
                ema.update(model, step=step)
            step += 1
            loss_sum += loss
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            bar.update()  # log
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step % steps_per_epoch:
                checkpoint()  # checkpoint
        bar.close()
        if step % steps_per_epoch == 0 or step == total_steps:
            metrics = evaluate(ema.module if ema else model, val_loader, device, len(spec.classes), cfg.amp)
            done = step - start - epoch * steps_per_epoch
            history.append({"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(done, 1),
                            "val_loss": metrics["loss"], "top1": metrics["top1"], "top5": metrics["top5"],
                            "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0})
            if main:
                print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}  val loss {metrics['loss']:.4f}  "
                      f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%")
                if metrics["top1"] > best:
                    best = metrics["top1"]
                    save_model(ema.module if ema else model, run / "best.safetensors", meta)
                _write_metrics(run, history, metrics, spec.classes)
                if writer is not None:
                    for k in ("train_loss", "val_loss", "top1", "top5", "lr"):
                        writer.add_scalar(k, history[-1][k], step)
            checkpoint()
    if world > 1:
        dist.destroy_process_group()
    return history[-1] if history else {}


def _write_metrics(run: Path, history: list[dict], last: dict, classes: list[str]) -> None:
    import csv

    from .weights import atomic_write

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
