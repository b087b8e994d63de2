"""Hostile input: every bad file, flag or folder ends in a one-line error naming its culprit (or in correct
behaviour), with no traceback and no existing file changed. Property-based fuzzing of the weight-metadata,
IDX and image readers, bounded in time."""
import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import write_fashion_like, write_idx, write_image_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from seqvision.cli import main
from seqvision.config import TrainConfig
from seqvision.data import DataError, ImageFiles, open_image, read_idx
from seqvision.train import train
from seqvision.weights import WeightsError, load_model, read_metadata

TINY = dict(model="sequencer2d_300k_28", batch_size=16, workers=0, warmup_epochs=0.5, threads=1, lr=1e-3,
            val_fraction=0.25, epochs=1)
TRAIN = ["--model", "sequencer2d_300k_28", "--batch-size", "16", "--workers", "0", "--threads", "1", "--epochs", "1",
         "--val-fraction", "0.25", "--warmup-epochs", "0.5"]


# Fixtures and helpers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tree, tmp_path_factory):
    """A finished tiny run folder (best.safetensors, two checkpoints kept)."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig(data=str(tree), output=str(folder), ckpt_every=1, **{**TINY, "batch_size": 8}))
    return folder


@pytest.fixture(scope="module")
def best(run):
    return run / "best.safetensors"


@pytest.fixture(scope="module")
def image(tree):
    return next((tree / "cat").glob("*.png"))


def snapshot(root: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    return code, capsys.readouterr().err


def refused(code: int, err: str, culprit: str, exit_code: int = 1) -> None:
    """Exit code, no traceback, and a last line that is the error naming the culprit."""
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert code == exit_code, err
    assert "Traceback" not in err and "Original" not in err, err
    assert "error:" in last and culprit in last, err


def with_metadata(src: Path, dst: Path, **changes) -> Path:
    meta = read_metadata(src)
    cfg = {**json.loads(meta["config"]), **changes.pop("config", {})}
    save_file(load_file(src), dst, metadata={**meta, "config": json.dumps(cfg), **changes})
    return dst


def with_tensors(src: Path, dst: Path, edit) -> Path:
    sd = load_file(src)
    edit(sd)
    save_file(sd, dst, metadata=read_metadata(src))
    return dst


# Flags: refused before anything is built or written ---------------------------------------------------

FLAGS = [
    (["--keep-ckpts", "-1"], "--keep-ckpts"), (["--max-steps", "-5"], "--max-steps"),
    (["--smoothing", "2"], "--smoothing"),
    (["--cooldown-epochs", "1"], "--cooldown-epochs"), (["--warmup-epochs", "-3"], "--warmup-epochs"),
    (["--mixup", "-1"], "--mixup"), (["--crop-pad", "-5"], "--crop-pad"), (["--ckpt-every", "-1"], "--ckpt-every"),
    (["--img-size", "13"], "--img-size"), (["--val-fraction", "1.5"], "--val-fraction"),
    (["--randaugment", "bogus"], "--randaugment"), (["--model", "sequencer2d_nope"], "sequencer2d_nope"),
    (["--std", "0", "--mean", "0.5"], "--std"), (["--seed", "-1"], "--seed"), (["--workers", "-1"], "--workers"),
    (["--drop-path", "1"], "--drop-path"), (["--min-lr", "1", "--lr", "0.1"], "--min-lr"),
    (["--warmup-epochs", "5"], "--warmup-epochs"),
]


@pytest.mark.parametrize("flags,culprit", FLAGS, ids=[" ".join(f) for f, _ in FLAGS])
def test_flag_refused_before_anything_is_written(tree, tmp_path, capsys, flags, culprit):
    out = tmp_path / "out"
    refused(*cli(capsys, "train", "--data", tree, "--output", out, *TRAIN, *flags), culprit)
    assert not out.exists()


def test_flag_of_the_wrong_type_is_refused_by_the_parser(tree, tmp_path, capsys):
    refused(*cli(capsys, "train", "--data", tree, "--lr", "abc"), "--lr", exit_code=2)
    refused(*cli(capsys, "predict", "--checkpoint", tmp_path, "--topk", "0", "x.png"), "--topk", exit_code=2)


@pytest.mark.parametrize("text,culprit", [("epochs: [1\n", "bad.yaml"), ("epochs: ten\n", "--epochs"),
                                          ("- 1\n- 2\n", "bad.yaml"), ("wings: 2\n", "wings")])
def test_bad_recipe_is_named(tree, tmp_path, capsys, text, culprit):
    (tmp_path / "bad.yaml").write_text(text)
    refused(*cli(capsys, "train", "--data", tree, "--output", tmp_path / "out", "--config", tmp_path / "bad.yaml"),
            culprit)


# Weight files -----------------------------------------------------------------------------------------

def _weights_cases(best: Path, d: Path) -> dict:
    half = d / "half.safetensors"
    half.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    (d / "zero.safetensors").write_bytes(b"")
    (d / "garbage.safetensors").write_bytes(os.urandom(3000))
    cfg = json.loads(read_metadata(best)["config"])
    return {
        "zero bytes": (d / "zero.safetensors", "zero.safetensors"),
        "garbage": (d / "garbage.safetensors", "garbage.safetensors"),
        "truncated": (half, "half.safetensors"),
        "5.4 billion parameters": (with_metadata(best, d / "huge.safetensors", config={
            "embed_dims": [8192] * len(cfg["embed_dims"]), "hidden_sizes": [2048] * len(cfg["embed_dims"])}),
            "huge.safetensors"),
        "dims of a million": (with_metadata(best, d / "million.safetensors", config={
            "embed_dims": [10**6] * len(cfg["embed_dims"])}), "million.safetensors"),
        "negative dims": (with_metadata(best, d / "negative.safetensors", config={
            "embed_dims": [-8] * len(cfg["embed_dims"])}), "negative.safetensors"),
        "unknown family": (with_metadata(best, d / "family.safetensors", family="transformer9"), "family.safetensors"),
        "config not JSON": (with_metadata(best, d / "json.safetensors", config={}) and
                            _raw_meta(best, d / "json.safetensors", config="{not json"), "json.safetensors"),
        "config a list": (_raw_meta(best, d / "list.safetensors", config="[1, 2]"), "list.safetensors"),
        "config wrong type": (with_metadata(best, d / "type.safetensors", config={"layers": "x"}), "type.safetensors"),
        "config unknown key": (with_metadata(best, d / "key.safetensors", config={"wings": 2}), "key.safetensors"),
        "NaN weights": (with_tensors(best, d / "nan.safetensors", lambda sd: sd["head.fc.weight"].fill_(float("nan"))),
                        "head.fc.weight"),
        "int8 in a float model": (with_tensors(best, d / "int8.safetensors", lambda sd: sd.update(
            {"head.fc.weight": sd["head.fc.weight"].to(torch.int8)})), "head.fc.weight"),
        "missing key": (with_tensors(best, d / "missing.safetensors", lambda sd: sd.pop("head.fc.bias")),
                        "head.fc.bias"),
        "no metadata": (_raw_meta(best, d / "plain.safetensors", format="timm"), "plain.safetensors"),
    }


def _raw_meta(src: Path, dst: Path, **meta) -> Path:
    save_file(load_file(src), dst, metadata={**read_metadata(src), **meta})
    return dst


WEIGHT_CASES = ["zero bytes", "garbage", "truncated", "5.4 billion parameters", "dims of a million", "negative dims",
                "unknown family", "config not JSON", "config a list", "config wrong type", "config unknown key",
                "NaN weights", "int8 in a float model", "missing key", "no metadata"]


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_bad_weights_file_is_named(best, image, tmp_path, capsys, case):
    path, culprit = _weights_cases(best, tmp_path)[case]
    before = snapshot(tmp_path)
    refused(*cli(capsys, "predict", "--checkpoint", path, image), culprit)
    assert snapshot(tmp_path) == before


def test_metadata_asking_for_billions_allocates_nothing_of_that_size(best, tmp_path):
    import resource

    path = _weights_cases(best, tmp_path)["5.4 billion parameters"][0]
    assert path.stat().st_size < 2e6
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WeightsError, match=r"asks for a model of [\d,]+ values, but its tensors hold"):
        load_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no 21 GB model


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("kind", ["code-running pickle", "zero-byte pth", "text pth"])
def test_torch_files_are_never_unpickled_unsafely(tmp_path, capsys, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "w.pth"
    if kind == "code-running pickle":
        src.write_bytes(pickle.dumps({"state_dict": Payload()}))
    else:
        src.write_bytes(b"" if kind == "zero-byte pth" else b"hello")
    refused(*cli(capsys, "convert", src, tmp_path / "o.safetensors", "--model", "sequencer2d_300k_28"), "w.pth")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.safetensors").exists()


def test_run_folder_without_weights_is_named(tmp_path, image, capsys):
    (tmp_path / "empty").mkdir()
    refused(*cli(capsys, "predict", "--checkpoint", tmp_path / "empty", image), "empty")


# Images -----------------------------------------------------------------------------------------------

def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid 1-bit PNG header declaring side x side pixels, with a tiny (wrong) data stream."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) +
                     chunk(b"IEND", b""))
    return path


def _image_cases(image: Path, d: Path) -> dict:
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    (d / "half.png").write_bytes(image.read_bytes()[:100])
    return {"decompression bomb": (bomb_png(d / "bomb.png"), "bomb.png"), "zero bytes": (d / "zero.png", "zero.png"),
            "text": (d / "text.png", "text.png"), "truncated": (d / "half.png", "half.png"),
            "missing": (d / "absent.png", "absent.png")}


@pytest.mark.parametrize("case", ["decompression bomb", "zero bytes", "text", "truncated", "missing"])
def test_bad_image_to_predict_is_named(best, image, tmp_path, capsys, case):
    path, culprit = _image_cases(image, tmp_path)[case]
    refused(*cli(capsys, "predict", "--checkpoint", best, path), culprit)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    data = bomb_png(tmp_path / "b.png").read_bytes()
    with pytest.raises(DataError, match="image bytes: refused, a possible decompression bomb"):
        open_image(data)  # its IDAT is far too short: decoding would fail differently


@pytest.mark.parametrize("mode", ["16-bit", "float [0, 1]", "float [0, 255]", "palette", "CMYK", "RGBA", "1-bit"])
def test_image_formats_are_scaled_like_their_8_bit_twin(tmp_path, mode):
    grey = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
    rgb = np.stack([grey, 255 - grey, grey // 2], -1)
    path = tmp_path / ("x.tif" if "float" in mode or mode == "CMYK" else "x.png")
    if mode == "16-bit":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
        want = grey
    elif mode.startswith("float"):
        scale = 1 / 255 if "[0, 1]" in mode else 1.0
        Image.fromarray(grey.astype(np.float32) * scale, mode="F").save(path)
        want = grey
    elif mode == "palette":
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(path)
        want = np.asarray(Image.open(path).convert("RGB"))
    elif mode == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(path)
        want = np.asarray(Image.open(path).convert("RGB"))
    elif mode == "RGBA":
        Image.fromarray(np.concatenate([rgb, np.full((28, 28, 1), 128, np.uint8)], -1)).save(path)
        want = rgb
    else:
        Image.fromarray(grey > 127).save(path)
        want = np.repeat(((grey > 127) * 255).astype(np.uint8)[..., None], 3, -1)
    got = np.asarray(open_image(path))
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1


def test_float_image_with_nan_is_refused(tmp_path):
    a = np.zeros((8, 8), np.float32)
    a[0, 0] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="nan.tif.*NaN"):
        open_image(tmp_path / "nan.tif")


def test_animated_image_gives_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(open_image(tmp_path / "a.gif").convert("L")).mean() == pytest.approx(10, abs=1)


def _corrupt_tree(tree: Path, dst: Path, broken: dict) -> Path:
    shutil.copytree(tree, dst)
    for rel, write in broken.items():
        write(dst / rel)
    return dst


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_training_image_is_one_line_naming_it(tree, tmp_path, capsys, workers):
    data = _corrupt_tree(tree, tmp_path / "data", {"dog/005.png": lambda p: p.write_bytes(b"junk")})
    refused(*cli(capsys, "train", "--data", data, "--output", tmp_path / "out", *TRAIN, "--workers", workers),
            "005.png")


def test_skip_corrupt_skips_bombs_and_broken_files(tree, tmp_path, capsys):
    data = _corrupt_tree(tree, tmp_path / "data", {"dog/005.png": bomb_png,
                                                   "cat/001.png": lambda p: p.write_bytes(b"")})
    code, err = cli(capsys, "train", "--data", data, "--output", tmp_path / "out", *TRAIN, "--skip-corrupt")
    assert code == 0, err
    assert (tmp_path / "out" / "best.safetensors").exists()


def test_skip_corrupt_with_nothing_readable_is_a_clear_error(tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(16):
            (tmp_path / "data" / c / f"{i}.png").write_bytes(b"junk")
    refused(*cli(capsys, "train", "--data", tmp_path / "data", "--output", tmp_path / "out", *TRAIN, "--skip-corrupt"),
            "none of its")
    ds = ImageFiles([(str(tmp_path / "data/a/0.png"), 0)] * 3, ["a"], skip_corrupt=True)
    with pytest.raises(DataError, match="none of its 3 images"):
        ds[0]


def test_dataset_with_one_class_is_refused(tmp_path, capsys):
    data = write_image_tree(tmp_path / "one", classes=("only",))
    refused(*cli(capsys, "train", "--data", data, "--output", tmp_path / "out", *TRAIN), "one")
    assert not (tmp_path / "out").exists()


# IDX files --------------------------------------------------------------------------------------------

def _idx_cases(d: Path) -> dict:
    root = write_fashion_like(d / "fm")
    img = root / "train-images-idx3-ubyte.gz"
    lbl = root / "train-labels-idx1-ubyte.gz"
    return {
        "damaged gzip": (lambda: img.write_bytes(img.read_bytes()[:200] + b"\0" * 50), img.name),
        "32x32 images": (lambda: write_idx(img, np.zeros((64, 32, 32))), img.name),
        "labels too few": (lambda: write_idx(lbl, np.zeros(10)), "do not pair up"),
        "label out of range": (lambda: write_idx(lbl, np.full(64, 12)), lbl.name),
        "wrong magic": (lambda: img.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + b"\0" * 100)), img.name),
        "short data": (lambda: img.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 64, 28, 28))),
                       img.name),
        "missing file": (lambda: lbl.unlink(), "not found"),
    }, root


@pytest.mark.parametrize("case", ["damaged gzip", "32x32 images", "labels too few", "label out of range",
                                  "wrong magic", "short data", "missing file"])
def test_bad_idx_file_is_named(tmp_path, capsys, case):
    cases, root = _idx_cases(tmp_path)
    damage, culprit = cases[case]
    damage()
    before = snapshot(root)
    refused(*cli(capsys, "train", "--data", "fashion-mnist", "--data-root", root, "--output", tmp_path / "out",
                 *TRAIN), culprit)
    assert snapshot(root) == before and not (tmp_path / "out").exists()


# Run folders ------------------------------------------------------------------------------------------

def test_folder_with_any_run_file_is_not_overwritten(run, tree, tmp_path, capsys):
    folder = tmp_path / "partial"
    folder.mkdir()
    shutil.copy(run / "best.safetensors", folder)
    shutil.copy(run / "metrics.json", folder)
    before = snapshot(folder)
    refused(*cli(capsys, "train", "--data", tree, "--output", folder, *TRAIN), "--resume")
    assert snapshot(folder) == before


def test_second_trainer_on_a_folder_is_refused_naming_the_first(tree, tmp_path, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    with open(folder / ".lock", "a+") as f:  # what a running trainer holds
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("process 4242 on node-7\n")
        f.flush()
        refused(*cli(capsys, "train", "--data", tree, "--output", folder, *TRAIN), "process 4242 on node-7")
    assert [p.name for p in folder.iterdir()] == [".lock"]


def test_garbage_run_json_on_resume_is_named(run, tree, tmp_path, capsys):
    folder = tmp_path / "r"
    shutil.copytree(run, folder)
    (folder / "run.json").write_text("{oops")
    before = snapshot(folder)
    refused(*cli(capsys, "train", "--data", tree, "--output", folder, "--resume"), "run.json")
    assert snapshot(folder) == before


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "deleted weights"])
def test_unreadable_checkpoint_falls_back_to_the_older_one(run, tree, tmp_path, capsys, damage):
    folder = tmp_path / "r"
    shutil.copytree(run, folder)
    stems = sorted((folder / "checkpoints").glob("step-*.state.pt"))
    assert len(stems) == 2
    newest = stems[-1].name.removesuffix(".state.pt")
    state = folder / "checkpoints" / f"{newest}.state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "zero bytes":
        state.write_bytes(b"")
    else:
        (folder / "checkpoints" / f"{newest}.safetensors").unlink()
    code, err = cli(capsys, "train", "--data", tree, "--output", folder, "--resume")
    assert code == 0, err
    assert newest in err and "newest intact" in err and "Traceback" not in err


def test_no_readable_checkpoint_is_a_clear_error(run, tree, tmp_path, capsys):
    folder = tmp_path / "r"
    shutil.copytree(run, folder)
    for p in (folder / "checkpoints").glob("*.state.pt"):
        p.write_bytes(b"")
    refused(*cli(capsys, "train", "--data", tree, "--output", folder, "--resume"), "no readable checkpoint")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_says_no_space_and_keeps_metrics_behind_the_checkpoint(tree, small_disk, capsys):
    folder = small_disk / "run"
    refused(*cli(capsys, "train", "--data", tree, "--output", folder, *TRAIN, "--epochs", "3"), "no space left")
    assert not list(folder.rglob("*.tmp"))
    if (folder / "metrics.json").exists():  # never ahead of the newest checkpoint a resume would start from
        epochs = len(json.loads((folder / "metrics.json").read_text()))
        steps = [int(p.name[5:13]) for p in (folder / "checkpoints").glob("step-*.state.pt")]
        assert steps and epochs <= len(steps)


def test_no_space_error_names_the_file_and_keeps_the_old_one(tmp_path):
    from seqvision.weights import atomic_write

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(WeightsError, match="metrics.json: no space left"):
        atomic_write(target, full)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_files_get_the_usual_modes(run):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("best.safetensors", "metrics.json", "run.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    for p in (run / "checkpoints").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name


# Fuzzing (bounded) ------------------------------------------------------------------------------------

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["layers", "embed_dims", "hidden_sizes", "patch_sizes", "mlp_ratio",
                                                "cell", "union", "img_size", "in_chans", "num_classes", "wings"]),
                               json_values, min_size=1, max_size=3))
def test_fuzzed_metadata_config_loads_or_is_refused_naming_the_file(best, tmp_path_factory, changes):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    try:
        with_metadata(best, path, config=changes)
    except ValueError:  # JSON cannot hold NaN as the safetensors header wants it
        return
    try:
        load_model(path)
    except WeightsError as e:
        assert "f.safetensors" in str(e)


@FUZZ
@given(data=st.binary(max_size=300), gz=st.booleans())
def test_fuzzed_idx_bytes_read_or_are_refused(tmp_path_factory, data, gz):
    path = tmp_path_factory.mktemp("idx") / "x.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    try:
        arr = read_idx(path)
    except DataError as e:
        assert "x.idx" in str(e)
    else:
        assert arr.dtype == np.uint8


@FUZZ
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=6))
def test_fuzzed_image_bytes_decode_or_are_refused(image, cut, flips):
    data = bytearray(image.read_bytes()[: max(cut, 0) or None])
    for i, v in flips:
        if i < len(data):
            data[i] = v
    with contextlib.suppress(DataError):
        im = open_image(bytes(data))
        assert im.mode in ("L", "RGB")


def test_bytes_and_files_read_alike(image):
    assert np.array_equal(np.asarray(open_image(image.read_bytes())), np.asarray(open_image(image)))
