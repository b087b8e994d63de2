"""Small datasets the tests write themselves: class-folder PNG trees and IDX files."""
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_tree(root: Path, classes=("cat", "dog", "fox"), per_class: int = 12, size: int = 28, seed: int = 0):
    """Grey PNGs whose brightness pattern depends on the class, so a model can learn something."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size), dtype=np.uint8)
            img[:, c * size // len(classes):(c + 1) * size // len(classes)] += 150
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


def write_fashion_like(folder: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 50, (n, 28, 28))
        for k, lbl in enumerate(labels):
            images[k, lbl * 2: lbl * 2 + 8] += 180
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder
