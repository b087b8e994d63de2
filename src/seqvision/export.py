"""Export to ONNX (dynamic batch, height and width, checked in onnxruntime) and to torch.export programs."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _prepare(model: nn.Module) -> nn.Module:
    # Exporters trace torch's RNN modules into their own LSTM ops; the C++ recurrence is not exportable.
    if hasattr(model, "set_backend"):
        model.set_backend("reference")
    return model.eval()


def _example(model: nn.Module, img_size: int | None, batch: int = 2) -> torch.Tensor:
    size = img_size or model.cfg.img_size[0]
    return torch.randn(batch, model.cfg.in_chans, size, size)


def export_onnx(model: nn.Module, path: str | Path, img_size: int | None = None, opset: int = 17) -> Path:
    """Write `model` as ONNX with a dynamic batch (and dynamic height/width unless the model fixes them)."""
    model = _prepare(model)
    x = _example(model, img_size)
    axes = {0: "batch"} if getattr(model, "fixed_input_size", False) else {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": axes, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
    return Path(path)


def check_onnx(model: nn.Module, path: str | Path, sizes: list[int], batch: int = 2) -> list[dict]:
    """Max |onnxruntime - PyTorch| of the logits at each input size."""
    import onnxruntime as ort

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


def export_program(model: nn.Module, path: str | Path, img_size: int | None = None, max_side: int = 1024):
    """torch.export with a dynamic batch and, where the model allows it, sides that are multiples of its stride."""
    from torch.export import Dim

    model = _prepare(model)
    x = _example(model, img_size)
    batch = Dim("batch", min=1, max=4096)
    if getattr(model, "fixed_input_size", False):
        shapes = {"x": {0: batch}}
    else:
        s = model.stride
        shapes = {"x": {0: batch, 2: s * Dim("h", min=1, max=max_side // s), 3: s * Dim("w", min=1, max=max_side // s)}}
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return program
