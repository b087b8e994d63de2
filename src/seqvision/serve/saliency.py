"""What the model looked at: the input-gradient saliency of the top class, as a PNG overlay."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def saliency(model: torch.nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """|d logit_target / d input|, max over channels and scaled to [0, 1]: (C, H, W) -> (H, W)."""
    x = x[None].clone().requires_grad_(True)
    with torch.enable_grad():
        model(x)[0, target].backward()
    s = x.grad[0].abs().amax(0)
    return s / s.max().clamp_min(1e-12)


def overlay(image: Image.Image, heat: torch.Tensor, side: int = 224) -> bytes:
    """The image in grey with the heat map in colour over it (alpha follows the heat), as PNG bytes."""
    from matplotlib import colormaps

    base = np.asarray(image.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32)[..., None] / 255
    # (H, W) -> (side, side): the map at the display size
    h = torch.nn.functional.interpolate(heat[None, None], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    h = h.clamp(0, 1).numpy()[..., None]
    colour = colormaps["inferno"](h[..., 0])[..., :3]
    rgb = base * (1 - 0.7 * h) + colour * 0.7 * h
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
