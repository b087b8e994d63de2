"""The `seqvision` command: one subcommand per job. Run `seqvision COMMAND --help` for each."""
from __future__ import annotations

import argparse
import csv
import json
import sys


def cmd_models(args) -> None:
    from . import create_model, list_models
    from .flops import count_macs, count_params
    from .registry import get_entry

    rows = []
    for name in list_models(args.pattern):
        cfg = get_entry(name).config
        model = create_model(name)
        size = (cfg.in_chans, *cfg.img_size)
        rows.append(dict(model=name, family=get_entry(name).family, input=f"{size[0]}x{size[1]}x{size[2]}",
                         params=count_params(model), gmacs=round(count_macs(model, size) / 1e9, 3)))
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(f"{'model':<30} {'family':<10} {'input':<11} {'params':>13} {'GMACs':>9}")
        for r in rows:
            print(f"{r['model']:<30} {r['family']:<10} {r['input']:<11} {r['params']:>13,} {r['gmacs']:>9.3f}")
        print("GMACs count convolutions, linear layers, attention products and the recurrent cells "
              "(input and hidden projections), at each model's default input size.")


def cmd_convert(args) -> None:
    from .weights import convert

    convert(args.src, args.dst, model_name=args.model, to=args.to)
    print(f"wrote {args.dst} ({args.to} format)")


def cmd_train(args) -> None:
    import time

    from .config import config_from_args
    from .report import write_report
    from .train import run_folder, train

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    train(cfg)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"report: {write_report(run_folder(cfg), time.perf_counter() - t0)}")


def cmd_validate(args) -> None:
    import torch

    from .checkpoint import load_for_inference
    from .data import Seeded, build_datasets, build_transform
    from .engine import evaluate

    model, classes, data = load_for_inference(args.checkpoint)
    spec = build_datasets(args.data, args.val_fraction, args.seed, args.skip_corrupt, args.data_root)
    if spec.classes != classes:
        raise ValueError(f"{args.checkpoint}: the model's classes {classes} disagree with {args.data}'s {spec.classes}")
    size = args.img_size or data.get("img_size") or model.cfg.img_size[0]
    tf = build_transform(False, size, model.cfg.in_chans, tuple(data.get("mean", (0.485, 0.456, 0.406))),
                         tuple(data.get("std", (0.229, 0.224, 0.225))), args.crop_pct or data.get("crop_pct", 0.875))
    loader = torch.utils.data.DataLoader(Seeded(spec.val, tf, 0), batch_size=args.batch_size, num_workers=args.workers)
    m = evaluate(model, loader, torch.device("cpu"), len(classes))
    m["classes"], m["img_size"] = classes, size
    if args.output:
        _write_validation(m, args.output)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['count']} images at {size}px)")
        for c, a in zip(classes, m["per_class_acc"]):
            print(f"  {c:<24} {a:6.2f}%")


def _write_validation(m: dict, folder: str) -> None:
    from pathlib import Path

    from .report import plot_confusion

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(m, indent=1))
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "accuracy"])
        w.writerows(zip(m["classes"], m["per_class_acc"]))
    plot_confusion(m["confusion"], m["classes"], out / "confusion.png")


def cmd_predict(args) -> None:
    import torch

    from .checkpoint import load_for_inference
    from .data import ImageFiles, build_transform

    model, classes, data = load_for_inference(args.checkpoint)
    size = data.get("img_size") or model.cfg.img_size[0]
    tf = build_transform(False, size, model.cfg.in_chans, tuple(data.get("mean", (0.485, 0.456, 0.406))),
                         tuple(data.get("std", (0.229, 0.224, 0.225))), data.get("crop_pct", 0.875))
    reader = ImageFiles([], classes)
    results = []
    with torch.no_grad():
        for path in args.files:
            probs = model(tf(reader.load(path))[None]).softmax(-1)[0]
            top = probs.topk(min(args.topk, len(classes)))
            results.append({"file": path, "top": [{"label": classes[i], "prob": round(p, 6)}
                                                  for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r["file"] + ": " + ", ".join(f"{t['label']} {t['prob'] * 100:.1f}%" for t in r["top"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqvision",
        description="Sequencer (deep LSTMs for image classification), ViT and MLP-Mixer: list models, "
                    "convert weights, train, validate, predict and benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list registered models with parameters and GMACs",
                       description="List every registered model with its parameter count and GMACs at its "
                                   "default input size (recurrent cells counted).")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter, e.g. 'sequencer2d_*'")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fmt.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert weights between seqvision/timm and the authors' format",
                       description="Convert a weight file (safetensors or torch, timm/seqvision or authors' keys) "
                                   "into a seqvision safetensors file with the config in its metadata, or into "
                                   "the authors' key format. Torch files are read with weights_only=True only.")
    p.add_argument("src", help="input weights: .safetensors, .pth, .pt or .bin")
    p.add_argument("dst", help="output file (.safetensors, or .pth with --to authors)")
    p.add_argument("--model", help="registered model the weights belong to (not needed for seqvision files)")
    p.add_argument("--to", choices=["seqvision", "authors"], default="seqvision",
                   help="key format to write (seqvision keys are timm's)")
    p.set_defaults(func=cmd_convert)

    from .config import TrainConfig, add_dataclass_args

    p = sub.add_parser("train", help="train a model (torchrun for several processes or machines)",
                       description="Train a registered model on a named dataset or image folders. Settings come "
                                   "from the defaults, then the recipe (--config), then flags. The run folder "
                                   "gets checkpoints, best.safetensors, metrics CSV/JSON, PNG plots and "
                                   "report.md. Several processes: torchrun --nproc-per-node N -m seqvision train ...")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="evaluate a checkpoint: top-1/5, loss, per-class accuracy, confusion",
                       description="Evaluate a run folder (its best weights) or a seqvision weights file on the "
                                   "validation split of --data, at any resolution and crop.")
    p.add_argument("--data", required=True, help="dataset name or folder, as for train")
    p.add_argument("--checkpoint", required=True, help="run folder or .safetensors file")
    p.add_argument("--img-size", type=int, default=0, help="evaluation size (default: the training size)")
    p.add_argument("--crop-pct", type=float, default=0.0, help="centre-crop fraction for large images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of a single class-folder tree")
    p.add_argument("--seed", type=int, default=0, help="seed of that split (use the training seed)")
    p.add_argument("--data-root", default=None, help="where a named dataset's files are")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--output", default="", help="folder for validation.json, per_class.csv, confusion.png")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("predict", help="top-k labels for image files",
                       description="Classify image files with a run folder's best weights or a weights file.")
    p.add_argument("files", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="run folder or .safetensors file")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"seqvision {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
