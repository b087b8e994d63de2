"""The `seqvision` command: one subcommand per job. Run `seqvision COMMAND --help` for each."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time


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
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"report: {write_report(run_folder(cfg), time.perf_counter() - t0)}")


def eval_data(args, meta: dict):
    """(split dataset, classes, split name) that validate/quantize score, from the run's own record.

    The dataset, the held-out fraction and the seed come from the weights' metadata (every file `train`
    writes records them) unless flags override them; a request that would score images the model was
    trained on (the run's data with another split) is refused.
    """
    from .data import build_datasets
    from .errors import ConfigError

    run = json.loads(meta.get("split", "null")) or {}
    data = args.data or run.get("data")
    if not data:
        raise ConfigError(f"{args.checkpoint} does not record its dataset: pass --data")
    fraction = args.val_fraction if args.val_fraction is not None else run.get("val_fraction", 0.1)
    seed = args.seed if args.seed is not None else run.get("seed", 0)
    if data == run.get("data") and args.split == "val" and (fraction, seed) != (run["val_fraction"], run["seed"]):
        raise ConfigError(f"{args.checkpoint} was trained with --val-fraction {run['val_fraction']} --seed "
                          f"{run['seed']} on {data}; another split would score training images (use --split test "
                          f"for the test split)")
    classes = run.get("classes", "") if data == run.get("data") else ""  # the run's class subset, if any
    spec = build_datasets(data, fraction, seed, getattr(args, "skip_corrupt", False), args.data_root, classes)
    if args.split == "test" and spec.test is None:
        raise ConfigError(f"--split test: {data} has no test split (a single class-folder tree)")
    return (spec.test if args.split == "test" else spec.val), spec.classes, data


def cmd_validate(args) -> None:
    import torch

    from .checkpoint import eval_transform, load_for_inference
    from .data import DataError, Seeded
    from .engine import evaluate

    model, classes, data, meta = load_for_inference(args.checkpoint)
    ds, data_classes, name = eval_data(args, meta)
    if data_classes != classes:
        raise DataError(f"{args.checkpoint}: the model's classes {classes} disagree with {name}'s {data_classes}")
    tf, size = eval_transform(model, data, args.img_size, args.crop_pct)
    loader = torch.utils.data.DataLoader(Seeded(ds, tf, 0), batch_size=args.batch_size, num_workers=args.workers)
    m = evaluate(model, loader, torch.device("cpu"), len(classes))
    m["classes"], m["img_size"], m["split"], m["data"] = classes, size, args.split, name
    if args.output:
        _write_validation(m, args.output)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{name} {args.split}: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  "
              f"({m['count']} images at {size}px)")
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

    from .checkpoint import eval_transform, load_for_inference
    from .data import open_image

    model, classes, data, _ = load_for_inference(args.checkpoint)
    tf, _ = eval_transform(model, data)
    results = []
    with torch.no_grad():
        for path in args.files:
            probs = model(tf(open_image(path))[None]).softmax(-1)[0]
            top = probs.topk(min(args.topk, len(classes)))
            results.append({"file": path, "top": [{"label": classes[i], "prob": round(p, 6)}
                                                  for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r["file"] + ": " + ", ".join(f"{t['label']} {t['prob'] * 100:.1f}%" for t in r["top"]))


def _emit(rows: list[dict], args) -> None:
    """Rows as a table, or JSON/CSV on stdout or into --output (by its suffix)."""
    if getattr(args, "output", ""):
        from pathlib import Path
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".json":
            out.write_text(json.dumps(rows, indent=1))
        else:
            with open(out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)))


def cmd_benchmark(args) -> None:
    from .benchmark import BenchConfig, int8_layer_rows, keep_freed_memory, machine, run_benchmark

    if args.keep_freed_memory:
        keep_freed_memory()
    print("# " + ", ".join(f"{k}: {v}" for k, v in machine().items()), file=sys.stderr)
    rows = []
    for mode in ["int8-layers"] if args.int8_layers else args.mode:
        for batch in args.batch_size:
            cfg = BenchConfig(model=args.model, batch_size=batch, img_size=args.img_size, mode=mode,
                              rounds=args.rounds, min_seconds=args.min_seconds, warmup=args.warmup,
                              threads=args.threads, backends=tuple(args.backends), timm=not args.no_timm,
                              int8=args.int8)
            print(f"# {args.model} {mode} batch {batch} ...", file=sys.stderr)
            rows += int8_layer_rows(cfg) if args.int8_layers else run_benchmark(cfg)
    _emit(rows, args)


def cmd_export(args) -> None:
    from . import create_model
    from .checkpoint import load_for_inference
    from .export import check_onnx, dynamic_sides, export_onnx, export_program

    model, data = (load_for_inference(args.checkpoint)[::2] if args.checkpoint else (create_model(args.model), {}))
    size = args.img_size or data.get("img_size") or 0  # a run's own training size unless overridden
    if args.format == "onnx":
        export_onnx(model, args.dst, size or None)
        base = size or model.cfg.img_size[0]
        sizes = [base, base + 2 * model.stride] if dynamic_sides(model) else [base]
        for r in check_onnx(model, args.dst, sizes):
            print(f"onnxruntime vs PyTorch at {r['size']}px, batch {r['batch']}: max abs diff {r['max_abs_diff']:.2e}")
    else:
        export_program(model, args.dst, size or None)
    print(f"wrote {args.dst}")


def cmd_quantize(args) -> None:
    import torch

    from .checkpoint import eval_transform, load_for_inference
    from .data import Seeded
    from .ops.int8 import native_kernel, pick_engine
    from .quantize import quantize_int8

    model, classes, data, meta = load_for_inference(args.checkpoint)
    qmodel = quantize_int8(model)  # a copy: model stays fp32
    ds, _, name = eval_data(args, meta)
    tf, _ = eval_transform(model, data)
    ds = Seeded(ds, tf, 0)
    n = min(args.limit or len(ds), len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=256)
    agree = correct_fp = correct_q = 0
    seconds, timed = {"fp32": 0.0, "int8": 0.0}, 0  # forward time of each model, and over how many images
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            counts = i > 0 or len(loader) == 1  # the first of several batches is the warm-up
            logits = {}
            for key, m in (("fp32", model), ("int8", qmodel)):
                t = time.perf_counter()
                logits[key] = m(x)
                seconds[key] += (time.perf_counter() - t) * counts
            timed += len(x) * counts
            a, b = logits["fp32"].argmax(1), logits["int8"].argmax(1)
            agree += (a == b).sum().item()
            correct_fp += (a == y).sum().item()
            correct_q += (b == y).sum().item()
    engine, reduce_range = pick_engine()
    speed = {k: timed / max(v, 1e-9) for k, v in seconds.items()}
    row = {"split": f"{name} {args.split}", "images": n, "top1_agreement": round(100 * agree / n, 2),
           "fp32_top1": round(100 * correct_fp / n, 2), "int8_top1": round(100 * correct_q / n, 2),
           "engine": engine, "activation_bits": 7 if reduce_range else 8,
           "native_kernel": native_kernel(reduce_range, 2),
           "fp32_img_s": round(speed["fp32"], 1), "int8_img_s": round(speed["int8"], 1),
           "int8_speedup": round(speed["int8"] / speed["fp32"], 2)}
    if row["int8_speedup"] < 1:
        print(f"note: int8 ran at {row['int8_speedup']}x fp32's speed here ({engine}, {row['activation_bits']}-bit "
              f"activations, batch {loader.batch_size}): for speed, keep the fp32 model on this CPU", file=sys.stderr)
    if args.dst:
        from .weights import save_model
        keep = {k: meta[k] for k in ("classes", "data", "split") if k in meta}  # what predict/validate read
        save_model(qmodel, args.dst, keep)
        row["saved"] = args.dst
    print(json.dumps(row) if args.json else "  ".join(f"{k} {v}" for k, v in row.items()))


def cmd_experiment(args) -> None:
    from .experiments import run

    command = "seqvision " + " ".join(args.argv)
    run(args.name, args.out, args.data, args.data_root, args.seeds, args.epochs, args.quick, args.budget,
        args.fractions, command=command, source=args.source, source_classes=args.source_classes,
        target=args.target, target_classes=args.target_classes, images=args.images)
    print(f"report: {os.path.join(args.out, 'report.md')}")
    if args.export_records:
        from pathlib import Path

        from .experiments.runner import export_records
        ids = export_records(Path(args.out), Path(args.export_records))
        print(f"records of {len(ids)} finished cell(s): {args.export_records}")


def cmd_serve(args) -> None:
    from .errors import ConfigError
    from .serve.app import serve

    if args.max_wait_ms < 0 or args.max_mb <= 0:
        raise ConfigError(f"--max-wait-ms must be >= 0 and --max-mb > 0, got {args.max_wait_ms} and {args.max_mb}")
    serve(args.checkpoint, args.host, args.port, args.int8, args.threads, args.max_batch, args.max_wait_ms,
          args.max_mb)


def cmd_serve_bench(args) -> None:
    from .serve.bench import run

    image = open(args.image, "rb").read() if args.image else None
    for c in args.concurrency:
        print(json.dumps(run(args.url, args.requests, c, image)))


def add_eval_data_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint and evaluation-data flags of validate and quantize; the run's own settings by default."""
    p.add_argument("--checkpoint", required=True, help="run folder or .safetensors file")
    p.add_argument("--data", default=None, help="dataset name or folder, as for train (default: the run's)")
    p.add_argument("--split", choices=["val", "test"], default="val",
                   help="val: the run's held-out part of the training data; test: the test split")
    p.add_argument("--val-fraction", type=float, default=None, help="held-out share (default: the run's)")
    p.add_argument("--seed", type=at_least(0), default=None, help="seed of that split (default: the run's)")
    p.add_argument("--data-root", default=None, help="where a named dataset's files are")


def at_least(low: int):
    """An argparse type: an integer >= `low`, refused by argparse with the flag and value otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqvision",
        description="Sequencer (deep LSTMs for image classification), ViT and MLP-Mixer: list models, "
                    "convert weights, train, validate, predict and benchmark.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"seqvision {__version__}")
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
                                   "run's held-out validation split (default) or the test split (--split test), "
                                   "at any resolution and crop. Dataset and split come from the run.")
    add_eval_data_args(p)
    p.add_argument("--img-size", type=at_least(0), default=0, help="evaluation size (default: the training size)")
    p.add_argument("--crop-pct", type=float, default=0.0, help="centre-crop fraction for large images")
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--workers", type=at_least(0), default=2)
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--output", default="", help="folder for validation.json, per_class.csv, confusion.png")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("predict", help="top-k labels for image files",
                       description="Classify image files with a run folder's best weights or a weights file.")
    p.add_argument("files", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="run folder or .safetensors file")
    p.add_argument("--topk", type=at_least(1), default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="an HTTP API and a web page for a trained model",
                       description="Serve a run folder or weights file on FastAPI/uvicorn: POST /predict (one image, "
                                   "multipart or raw bytes), POST /predict/batch, POST /explain (saliency overlay), "
                                   "GET /model, GET /health, and a web page at /. Concurrent requests are "
                                   "micro-batched. Needs the serve extra: pip install 'seqvision[serve]'.")
    p.add_argument("--checkpoint", required=True, help="run folder or .safetensors file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=at_least(1), default=8000)
    p.add_argument("--int8", action="store_true", help="answer with the int8 model (CPU)")
    p.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: torch's)")
    p.add_argument("--max-batch", type=at_least(1), default=16, help="most requests per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a request waits for others to join")
    p.add_argument("--max-mb", type=float, default=8.0, help="largest request body, in MiB (larger: 413)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-bench", help="load-test a running server: req/s, p50, p99, errors",
                       description="Send --requests POST /predict to a running `seqvision serve` with --concurrency "
                                   "in flight, and report throughput, latency percentiles and errors.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--requests", type=at_least(1), default=500)
    p.add_argument("--concurrency", type=at_least(1), nargs="+", default=[1, 8], help="one run per value")
    p.add_argument("--image", default="", help="image file to send (default: noise of the model's input size)")
    p.set_defaults(func=cmd_serve_bench)

    p = sub.add_parser("benchmark", help="throughput against timm's implementation, same weights and threads",
                       description="Inference or training throughput of a model (each BiLSTM2D backend) and of "
                                   "timm's equivalent with the same weights, in one process, alternating rounds "
                                   "after warm-up. Reports median img/s, the median of per-round ratios, GFLOP/s "
                                   "achieved as a share of this machine's measured fp32 matmul rate, and memory.")
    p.add_argument("--model", default="sequencer2d_s")
    p.add_argument("--batch-size", type=at_least(1), nargs="+", default=[16])
    p.add_argument("--img-size", type=at_least(0), default=0, help="input side (default: the model's)")
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    p.add_argument("--rounds", type=at_least(1), default=7, help="alternating rounds, at least")
    p.add_argument("--min-seconds", type=float, default=30.0,
                   help="keep timing rounds until this many seconds have passed (per model, mode and batch), so "
                        "a machine whose speed drifts over minutes gets enough rounds for a stable median; "
                        "0: exactly --rounds")
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: torch's)")
    p.add_argument("--backends", nargs="+", default=["auto", "reference"], help="Sequencer backends to time")
    p.add_argument("--int8", action="store_true", help="also time the dynamic-int8 model (inference)")
    p.add_argument("--int8-layers", action="store_true",
                   help="instead of whole models: int8 against fp32 for each GEMM shape of the model's inference "
                        "(every Linear and BiLSTM2D's input projection), and which of the two quantize_int8 "
                        "runs for it on this CPU")
    p.add_argument("--no-timm", action="store_true", help="skip timm's implementation")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="make glibc's malloc keep freed memory in this process (as jemalloc/tcmalloc do): "
                        "implementations that allocate fresh tensors every step then stop page-faulting")
    p.add_argument("--output", default="", help="write the rows to a .csv or .json file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("export", help="export to ONNX (checked in onnxruntime) or a torch.export program",
                       description="Export a registered model or a trained checkpoint. ONNX gets a dynamic batch, "
                                   "height and width and is compared with PyTorch in onnxruntime at two sizes.")
    p.add_argument("dst", help="output file (.onnx or .pt2)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model (random init)")
    src.add_argument("--checkpoint", help="run folder or seqvision .safetensors")
    p.add_argument("--format", choices=["onnx", "torch.export"], default="onnx")
    p.add_argument("--img-size", type=at_least(0), default=0)
    p.set_defaults(func=cmd_export)

    from .experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="the paper's claims as experiments: compare, resolution, erf, ablation, "
                                          "transfer, robustness",
                       description="Run one experiment of the paper at small scale. compare: Sequencer2D, ViT and "
                                   "Mixer at matched budgets over seeds and shares of the training data; "
                                   "resolution: the same models scored at other test sizes without fine-tuning; "
                                   "erf: effective receptive fields of trained and untrained models; "
                                   "ablation: the paper's "
                                   "variants of one Sequencer2D; transfer: fine-tuned vs from scratch on a target "
                                   "at 1/10/100% of its labels; robustness: ImageNet-C-style corruption errors "
                                   "and mCE. Each cell "
                                   "is a run folder under OUT/cells (a rerun skips finished cells and resumes a "
                                   "killed one); results.csv and plots go to OUT/NAME, a section to "
                                   "OUT/report.md.")
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--data", default="fashion-mnist", help="dataset name or class-folder tree, as for train")
    p.add_argument("--data-root", default="", help="where a named dataset's files are")
    p.add_argument("--out", default="runs/experiments", help="output folder (shared by the experiments)")
    p.add_argument("--seeds", type=at_least(0), nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=at_least(0), default=0, help="epochs per cell (default: the small recipe's)")
    p.add_argument("--budget", choices=["1m", "5m"], default="1m", help="parameter budget of the models")
    p.add_argument("--fractions", type=float, nargs="+", default=None,
                   help="shares of the training split: compare runs each (default 0.05 0.2 1); the others take "
                        "one (default 1) and share compare's cells of it (transfer: its source runs)")
    p.add_argument("--source", default="", help="transfer: pretraining data (default: --data)")
    p.add_argument("--source-classes", default="", help="transfer: the source's classes, comma-separated names or "
                                                         "indices (default with one dataset: its first half)")
    p.add_argument("--target", default="", help="transfer: fine-tuning data (default: --data)")
    p.add_argument("--target-classes", default="", help="transfer: the target's classes (default with one dataset: "
                                                         "the second half)")
    p.add_argument("--images", type=at_least(1), default=2000, help="robustness: test images to corrupt")
    p.add_argument("--quick", action="store_true", help="a minutes-long smoke version (1 seed, 2 steps)")
    p.add_argument("--export-records", default="", metavar="DIR",
                   help="afterwards copy every finished cell's records (JSON, no weights) under OUT/cells to "
                        "DIR/<cell>/; copied back into an OUT/cells, compare and ablation reuse them untrained")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("quantize", help="int8 CPU inference model, measured for agreement with fp32",
                       description="Quantise a trained checkpoint to int8 for CPU inference (every Linear and "
                                   "BiLSTM2D's input projection: int8 weights per channel, activations quantised "
                                   "per batch; the recurrence stays float32) and report top-1 agreement with "
                                   "fp32, both accuracies on the validation split of --data, and both models' "
                                   "images/s over it (batches of 256, the first left out as warm-up); says so "
                                   "when int8 is not the faster one on this CPU.")
    add_eval_data_args(p)
    p.add_argument("--limit", type=at_least(0), default=0, help="use the first N validation images (0: all)")
    p.add_argument("--dst", default="", help="save the int8 model here (.safetensors; seqvision.load_model "
                                             "rebuilds it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures print one line and return 1 (`--debug` raises them instead)."""
    from .errors import SeqvisionError, message

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for reports
    try:
        args.func(args)
    except (SeqvisionError, FileNotFoundError, FileExistsError, KeyError) as e:
        if args.debug:
            raise
        print(f"seqvision {args.command}: error: {message(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
