"""Training, resume, DDP, evaluation and prediction on data the tests write themselves."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import seqvision
from seqvision import cli
from seqvision.checkpoint import latest_checkpoint
from seqvision.config import TrainConfig
from seqvision.data import DataError, build_datasets, find_fashion_mnist, read_idx
from seqvision.engine import NonFiniteLoss
from seqvision.errors import ConfigError
from seqvision.train import train

from helpers_data import write_fashion_like, write_idx, write_image_tree

TINY = dict(model="sequencer2d_1m_28", batch_size=16, workers=0, warmup_epochs=0.5, deterministic=True,
            threads=1, lr=1e-3)


def weights(run: Path, name: str = None) -> dict:
    stem = latest_checkpoint(run)
    return load_file(f"{stem}.safetensors" if name is None else run / name)


@pytest.fixture(scope="module")
def trained_run(tree, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    cfg = TrainConfig(data=str(tree), output=str(run), epochs=2, val_fraction=0.25, **TINY)
    train(cfg)
    return run


def test_run_folder_contents(trained_run):
    for name in ("best.safetensors", "metrics.csv", "metrics.json", "run.json", "latest", "val_last.json"):
        assert (trained_run / name).exists(), name
    history = json.loads((trained_run / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["step"] == 2 * (27 // 16)
    assert (trained_run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,train_loss")


def test_refuses_to_overwrite_a_run(tree, trained_run):
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(data=str(tree), output=str(trained_run), epochs=2, val_fraction=0.25, **TINY))


def test_report_and_validate_and_predict(tree, trained_run, capsys, tmp_path):
    from seqvision.report import write_report
    report = write_report(trained_run)
    assert "top-1" in report.read_text() and (trained_run / "curves.png").stat().st_size > 1000
    # dataset, fraction and seed come from the run: the 9 images it held out
    assert cli.main(["validate", "--checkpoint", str(trained_run), "--json", "--output", str(tmp_path / "val")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 9 and len(out["per_class_acc"]) == 3 and out["data"] == str(tree)
    assert (tmp_path / "val" / "confusion.png").exists() and (tmp_path / "val" / "per_class.csv").exists()
    history = json.loads((trained_run / "metrics.json").read_text())
    assert out["top1"] == pytest.approx(max(h["top1"] for h in history))  # best weights, same split
    files = [str(p) for p in sorted((tree / "dog").glob("*.png"))[:2]]
    assert cli.main(["predict", *files, "--checkpoint", str(trained_run), "--json", "--topk", "2"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in preds] == files
    for p in preds:
        probs = [t["prob"] for t in p["top"]]
        assert len(probs) == 2 and 1 >= probs[0] >= probs[1] >= 0 and sum(probs) <= 1 + 1e-6
        assert p["top"][0]["label"] in ("cat", "dog", "fox")


def test_quantize_command_writes_a_loadable_int8_model(tree, trained_run, capsys, tmp_path):
    dst = tmp_path / "int8.safetensors"
    assert cli.main(["quantize", "--checkpoint", str(trained_run), "--dst", str(dst), "--json"]) == 0
    printed = capsys.readouterr()
    row = json.loads(printed.out)
    assert row["images"] == 9 and row["saved"] == str(dst)
    # both models timed over the same images; a note when int8 is the slower one here
    assert row["fp32_img_s"] > 0 and row["int8_img_s"] > 0
    assert abs(row["int8_speedup"] - row["int8_img_s"] / row["fp32_img_s"]) <= 0.01
    assert ("keep the fp32 model" in printed.err) == (row["int8_speedup"] < 1)
    assert row["top1_agreement"] >= 77  # at most 2 of the 9 held-out images change class
    q = seqvision.load_model(dst).eval()
    assert getattr(q, "int8", False) and any(type(m).__name__ == "Int8Linear" for m in q.modules())
    fp = seqvision.load_model(trained_run / "best.safetensors").eval()
    x = torch.randn(4, fp.cfg.in_chans, *fp.cfg.img_size)
    with torch.no_grad():
        a, b = fp(x), q(x)
    assert ((a - b).norm() / a.norm()).item() < 0.05
    # the int8 file keeps the run's class names and preprocessing, and loads where no compiler is
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    img = str(sorted((tree / "fox").glob("*.png"))[0])
    res = subprocess.run([sys.executable, "-m", "seqvision", "predict", img, "--checkpoint", str(dst), "--json"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert {t["label"] for t in json.loads(res.stdout)[0]["top"]} == {"cat", "dog", "fox"}


def test_validate_refuses_to_score_training_images(trained_run, capsys):
    assert cli.main(["validate", "--checkpoint", str(trained_run), "--val-fraction", "0.5"]) == 1
    assert "would score training images" in capsys.readouterr().err
    assert cli.main(["validate", "--checkpoint", str(trained_run), "--split", "test"]) == 1
    assert "has no test split" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="has no test split"):  # --debug: the exception itself, traceback and all
        cli.main(["--debug", "validate", "--checkpoint", str(trained_run), "--split", "test"])


def test_classes_disagreeing_with_checkpoint(tree, trained_run, tmp_path, capsys):
    other = write_image_tree(tmp_path / "other", classes=("ant", "bee", "cow"))
    assert cli.main(["validate", "--data", str(other), "--checkpoint", str(trained_run)]) == 1
    assert "disagree" in capsys.readouterr().err
    with pytest.raises(ValueError, match="disagree"):
        train(TrainConfig(data=str(other), output=str(trained_run), epochs=2, resume=True, val_fraction=0.25,
                          **TINY))


def test_resume_refuses_changed_settings_and_continues_with_its_own(tree, trained_run, capsys):
    with pytest.raises(ConfigError, match=r"--batch-size 16 -> 8"):
        train(TrainConfig(data=str(tree), output=str(trained_run), epochs=2, val_fraction=0.25, resume=True,
                          **{**TINY, "batch_size": 8}))
    assert cli.main(["train", "--output", str(trained_run), "--resume", "--epochs", "3"]) == 1
    assert "--epochs 2 -> 3" in capsys.readouterr().err
    before = weights(trained_run)
    # --resume alone: the run's own model, data and split (not the defaults), already finished
    assert cli.main(["train", "--output", str(trained_run), "--resume"]) == 0
    assert all(torch.equal(before[k], v) for k, v in weights(trained_run).items())


@pytest.mark.parametrize("clip", [0.0, 1.0])  # with clipping, the check reads the norm clipping computed
def test_non_finite_gradient_stops_before_the_step_and_keeps_latest(tree, tmp_path, monkeypatch, clip):
    run = tmp_path / "run"
    train(TrainConfig(data=str(tree), output=str(run), epochs=3, max_steps=1, val_fraction=0.25, clip_grad=clip,
                      **TINY))
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    import seqvision.engine as engine
    real = engine.train_micro_step

    def poisoned(model, *a, **k):
        loss = real(model, *a, **k)  # a finite loss, then one gradient goes bad
        model.stages[1].blocks[0].mlp_channels.fc1.weight.grad[0, 0] = float("nan")
        return loss

    monkeypatch.setattr("seqvision.train.train_micro_step", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"gradient of stages\.1\.blocks\.0\.mlp_channels\.fc1\.weight .* step 2"):
        train(TrainConfig(data=str(tree), output=str(run), epochs=3, val_fraction=0.25, resume=True, clip_grad=clip,
                          **TINY))
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_fine_tuning_from_a_run_with_other_classes(trained_run, tmp_path):
    two = write_image_tree(tmp_path / "two", classes=("left", "right"), per_class=12)
    run = tmp_path / "probe"
    train(TrainConfig(data=str(two), output=str(run), epochs=1, val_fraction=0.25, pretrained=str(trained_run),
                      freeze_backbone=True, **TINY))
    src, got = load_file(trained_run / "best.safetensors"), weights(run)
    head = {k for k in got if k.startswith("head.")}
    assert got["head.fc.weight"].shape == (2, src["head.fc.weight"].shape[1])
    assert all(torch.equal(src[k], got[k]) for k in got if k not in head)  # frozen backbone: the run's weights
    assert not torch.equal(got["head.fc.weight"], torch.zeros_like(got["head.fc.weight"]))  # the head trained
    assert json.loads((run / "run.json").read_text())["train"]["pretrained"] == str(trained_run)


def test_fine_tuning_to_as_many_other_classes_starts_a_fresh_head(trained_run):
    from seqvision.train import build_model

    src = load_file(trained_run / "best.safetensors")
    classes = json.loads((trained_run / "run.json").read_text())["classes"]
    cfg = TrainConfig(pretrained=str(trained_run), **TINY)
    torch.manual_seed(0)
    fresh = build_model(TrainConfig(**TINY), [f"other{i}" for i in classes]).state_dict()
    torch.manual_seed(0)
    other = build_model(cfg, [f"other{i}" for i in classes]).state_dict()  # same count, other names
    same = build_model(cfg, classes).state_dict()
    assert not torch.equal(src["head.fc.weight"], fresh["head.fc.weight"])
    for k, v in src.items():
        assert torch.equal(same[k], v), k
        assert torch.equal(other[k], fresh[k] if k.startswith("head.") else v), k


@pytest.mark.parametrize("flag,value,match", [
    ("keep_ckpts", -1, "--keep-ckpts must be at least 1"), ("keep_ckpts", 0, "--keep-ckpts"),
    ("max_steps", -5, "--max-steps must be at least 0, got -5"), ("smoothing", 2.0, r"--smoothing must be in \[0, 1\)"),
    ("cooldown_epochs", 10, r"--cooldown-epochs must be below --epochs \(10\)"),
    ("train_fraction", 0.0, "--train-fraction")])
def test_settings_that_cannot_run_are_refused_up_front(tree, tmp_path, flag, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(data=str(tree), output=str(tmp_path / "run"), **{**TINY, "epochs": 10, flag: value})
    assert not (tmp_path / "run").exists()


def test_bad_recipe_and_run_record_name_their_file(tree, trained_run, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lr: [1, 2\n")
    assert cli.main(["train", "--data", str(tree), "--config", str(recipe)]) == 1
    assert f"{recipe}: not valid YAML" in capsys.readouterr().err
    run = tmp_path / "garbage"
    run.mkdir()
    (run / "run.json").write_text("{not json")
    assert cli.main(["train", "--data", str(tree), "--output", str(run), "--resume"]) == 1
    assert f"{run / 'run.json'}: not a seqvision run record" in capsys.readouterr().err


def test_missing_optional_package_names_its_extra(tree, tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    run = tmp_path / "tb"
    assert cli.main(["train", "--data", str(tree), "--output", str(run), "--tensorboard"]) == 1
    assert "pip install 'seqvision[tensorboard]'" in capsys.readouterr().err
    assert not run.exists()  # refused before anything was written


def test_recipes_that_fine_tune_refuse_to_start_without_weights(tree, capsys):
    for recipe in ("transfer", "finetune392"):
        with pytest.raises(ConfigError, match="--pretrained"):
            TrainConfig(data=str(tree), config=recipe)
        assert cli.main(["train", "--data", str(tree), "--config", recipe]) == 1
        assert "--pretrained" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "zero-byte"])
def test_unreadable_images_stop_with_their_path(tmp_path, damage):
    root = write_image_tree(tmp_path / "tree", per_class=4)
    bad = root / "cat" / "001.png"
    data = bad.read_bytes()
    bad.write_bytes({"corrupt": b"not an image at all" * 10, "truncated": data[: len(data) // 3], "zero-byte": b""}[damage])
    cfg = TrainConfig(data=str(root), output=str(tmp_path / "run"), epochs=1, val_fraction=0.25,
                      **{**TINY, "batch_size": 4})
    with pytest.raises(DataError, match=str(bad)):
        spec = build_datasets(str(root), 0.25)
        for i in range(len(spec.train)):
            spec.train[i]
        for i in range(len(spec.val)):
            spec.val[i]
    with pytest.raises(DataError, match="--skip-corrupt"):
        train(cfg)
    spec = build_datasets(str(root), 0.25, skip_corrupt=True)
    ds = next(d for d in (spec.train, spec.val) if str(bad) in [p for p, _ in d.samples])
    i = [p for p, _ in ds.samples].index(str(bad))
    # the unreadable file is stood in for by the next one, image and label
    got, following = ds[i], ds[(i + 1) % len(ds)]
    assert np.array_equal(np.asarray(got[0]), np.asarray(following[0])) and got[1] == following[1]


def test_empty_class_folder(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=2)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty: class folder has no images"):
        build_datasets(str(root))


def test_idx_files(tmp_path):
    folder = write_fashion_like(tmp_path / "fm")
    assert find_fashion_mnist(folder) == folder
    spec = build_datasets("fashion-mnist", data_root=str(folder))
    # validation held out of the 64 training images (10%, seeded), the 32 test images kept apart
    assert (len(spec.train), len(spec.val), len(spec.test)) == (58, 6, 32) and spec.train[0][0].shape == (1, 28, 28)
    train_idx, val_idx = set(spec.train.indices), set(spec.val.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == 64
    assert build_datasets("fashion-mnist", data_root=str(folder)).val.indices == spec.val.indices
    assert build_datasets("fashion-mnist", data_root=str(folder), seed=1).val.indices != spec.val.indices
    broken = tmp_path / "bad-idx3-ubyte"
    write_idx(broken, np.zeros((4, 28, 28)))
    broken.write_bytes(broken.read_bytes()[:-10])
    with pytest.raises(DataError, match="needs 3136 bytes of data, file has 3126"):
        read_idx(broken)
    with pytest.raises(DataError, match="not found"):
        find_fashion_mnist(tmp_path / "nowhere")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tree, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(TrainConfig(data=str(tree), output=str(run), epochs=4, max_steps=1, val_fraction=0.25, **TINY))
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    import seqvision.engine as engine
    real = engine.train_micro_step
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        return float("nan") if len(calls) == 1 else real(*a, **k)

    monkeypatch.setattr("seqvision.train.train_micro_step", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 2"):
        train(TrainConfig(data=str(tree), output=str(run), epochs=4, val_fraction=0.25, resume=True, **TINY))
    after = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def _train_cmd(data, run, *extra):
    return [sys.executable, "-m", "seqvision", "train", "--data", str(data), "--output", str(run),
            "--model", "sequencer2d_1m_28", "--batch-size", "8", "--workers", "0", "--deterministic",
            "--threads", "1", "--val-fraction", "0.25", "--epochs", "3", "--ckpt-every", "1", "--lr", "1e-3", *extra]


def _wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, "training ended before the point the test waits for"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


IMAGENET_AUGMENT = ["--img-size", "64", "--randaugment", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0",
                    "--re-prob", "0.25", "--drop-path", "0.1"]


@pytest.mark.parametrize("augment", [[], IMAGENET_AUGMENT], ids=["small", "imagenet-augment-64px"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tree, tmp_path, augment):
    """Bit-identical with the ImageNet recipe's augmentations too (timm's RandAugment and erasing draw
    from numpy and random, mixup from numpy, drop path from torch: all seeded per sample and step)."""
    full = tmp_path / "full"
    subprocess.run(_train_cmd(tree, full, *augment), check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tree, run, *augment), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Steps per epoch: 27 train images // 8 = 3; step 4 is inside the second epoch.
    _wait_for(lambda: (run / "checkpoints" / "step-00000004.state.pt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = latest_checkpoint(run).name
    assert stopped_at != "step-00000009"
    subprocess.run(_train_cmd(tree, run, *augment, "--resume"), check=True, capture_output=True)
    a, b = weights(full), weights(run)
    assert latest_checkpoint(run).name == "step-00000009"
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed from {stopped_at} differs"
    evals = [[(h["epoch"], h["step"], h["val_loss"], h["top1"]) for h in json.loads((r / "metrics.json").read_text())]
             for r in (full, run)]
    assert evals[0] == evals[1]


KILL_IN_WRITE = """
import os, signal, sys
import seqvision.weights as w
real = w.save_bytes
count = [0]
def dying(data):
    def write(path):
        count[0] += 1
        real(data)(path)
        if count[0] == 3:  # the second checkpoint (weights, state, weights): half its file is on disk at death
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return write
w.save_bytes = dying
from seqvision.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_keeps_latest_loadable(tree, tmp_path):
    run = tmp_path / "run"
    cmd = _train_cmd(tree, run)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, *cmd[3:]], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".step-00000002.safetensors.*.tmp"))  # the half-written file
    stem = latest_checkpoint(run)
    assert stem.name == "step-00000001"
    load_file(f"{stem}.safetensors")
    torch.load(f"{stem}.state.pt", weights_only=True)
    subprocess.run(_train_cmd(tree, run, "--resume"), check=True, capture_output=True)
    assert latest_checkpoint(run).name == "step-00000009"
    assert not list(run.rglob("*.tmp"))  # the killed writer's orphan was cleared on the next start


def test_ddp_two_processes_match_one(tree, tmp_path):
    common = ["--data", str(tree), "--model", "sequencer2d_1m_28", "--batch-size", "8", "--workers", "0",
              "--threads", "1", "--val-fraction", "0.25", "--epochs", "1", "--smoothing", "0", "--lr", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "seqvision", "train", "--output", str(one), *common],
                   check=True, capture_output=True, env=env)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "seqvision", "train", "--output", str(two), *common],
                         capture_output=True, env=env, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(one), weights(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    h1, h2 = (json.loads((r / "metrics.json").read_text())[-1] for r in (one, two))
    assert h1["top1"] == h2["top1"]  # evaluation counts are summed across the two processes


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_learns(tmp_path):
    cfg = TrainConfig(data="fashion-mnist", output=str(tmp_path / "run"), epochs=1, max_steps=100,
                      batch_size=64, workers=0, warmup_epochs=0.01, lr=2e-3)
    result = train(cfg)
    assert result["test"]["count"] == 10_000  # the official test split, apart from the 6,000 held out
    # 100 steps of a 1M-parameter Sequencer: about 50% (chance is 10%), 48.9 to 51.4 on the test images
    # depending on the thread count the GEMMs ran with
    assert result["top1"] > 40 and result["test"]["top1"] > 40


def test_defaults_are_the_small_recipe():
    """A user who passes no --config trains with the main job's recipe (model and workers aside)."""
    import dataclasses

    from seqvision.config import load_recipe
    recipe = load_recipe("small")
    defaults = dataclasses.asdict(TrainConfig())
    assert {k: v for k, v in recipe.items() if k not in ("model", "workers")} == \
        {k: defaults[k] for k in recipe if k not in ("model", "workers")}
