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

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands that live beside the code they run."""
    return []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"seqvision {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
