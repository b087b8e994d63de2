"""Export to ONNX (dynamic batch, height and width, checked in onnxruntime) and to torch.export programs."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .errors import require
from .layers import resample_grid


def _prepare(model: nn.Module) -> nn.Module:
    # Exporters trace torch's RNN modules into their own LSTM ops; the C++ recurrence is not exportable.
    if hasattr(model, "set_backend"):
        model.set_backend("reference")
    return model.eval()


def _example(model: nn.Module, img_size: int | None, batch: int = 2) -> torch.Tensor:
    size = img_size or model.cfg.img_size[0]
    return torch.randn(batch, model.cfg.in_chans, size, size)


def dynamic_sides(model: nn.Module) -> bool:
    """Whether an ONNX graph of `model` can take any height and width.

    Not for Mixers (their token MLP fixes the size) nor for models with a position grid (ViT,
    v_sequencer_s_pe): their grid is resampled with antialiased bicubic interpolation, which ONNX lacks, so
    they are exported at one size (export again for another).
    """
    has_grid = any(getattr(model, n, None) is not None for n in ("pos_embed", "absolute_pos_embed"))
    return not getattr(model, "fixed_input_size", False) and not has_grid


def _bake_grid(model: nn.Module, size: int) -> nn.Module:
    """A copy whose position grid is stored already resampled for `size`, so no resampling is traced."""
    model = copy.deepcopy(model)
    if getattr(model, "absolute_pos_embed", None) is not None:  # vanilla Sequencer: (1, h, w, C)
        grid = (size // model.cfg.patch_sizes[0],) * 2
        model.absolute_pos_embed = nn.Parameter(resample_grid(model.absolute_pos_embed.data, grid))
    elif getattr(model, "pos_embed", None) is not None:  # ViT: (1, 1 + h*w, C)
        grid = (size // model.stride,) * 2
        model.pos_embed, model.grid = nn.Parameter(model.pos_embed_for(grid).data), grid
    return model


def export_onnx(model: nn.Module, path: str | Path, img_size: int | None = None, opset: int = 17) -> Path:
    """Write `model` as ONNX with a dynamic batch, and dynamic height/width where `dynamic_sides(model)`."""
    require("onnx", "export")
    model = _prepare(model)
    x = _example(model, img_size)
    if not dynamic_sides(model):
        model = _bake_grid(model, x.shape[-1])
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_sides(model) else {0: "batch"}
    torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": axes, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
    return Path(path)


def check_onnx(model: nn.Module, path: str | Path, sizes: list[int], batch: int = 2) -> list[dict]:
    """Max |onnxruntime - PyTorch| of the logits at each input size."""
    ort = require("onnxruntime", "export")

    model = _prepare(model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for s in sizes:
        x = torch.randn(batch, model.cfg.in_chans, s, s)
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        out.append({"size": s, "batch": batch, "max_abs_diff": float(abs(got - want).max())})
    return out


def export_program(model: nn.Module, path: str | Path, img_size: int | None = None):
    """torch.export with a dynamic batch. Height and width are fixed at export time: torch.export unrolls
    the LSTM over its steps, so the sequence lengths (the feature map's sides) become constants."""
    from torch.export import Dim

    model = _prepare(model)
    x = _example(model, img_size)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}})
    torch.export.save(program, str(path))
    return program
