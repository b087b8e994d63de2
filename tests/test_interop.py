"""timm and Hugging Face interop: timm.create_model for every preset, pretrained_cfg, hub folders (local and
from a hub-shaped cache, and in plain timm), backbones (features_only), and Fashion-MNIST without apt."""
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch
from conftest import random_state_dict, smallest_input
from helpers_data import write_fashion_like
from timm.data import resolve_data_config

import seqvision
from seqvision.data import DataError, _idx_bytes, download_fashion_mnist, find_fashion_mnist

ALL = seqvision.list_models()
SMALL = [n for n in ALL if n.endswith(("_28", "_32"))]


# timm registration and pretrained_cfg -----------------------------------------------------------------

def test_every_preset_is_a_timm_model_under_its_prefix():
    assert sorted(timm.list_models("seqvision_*")) == sorted("seqvision_" + n for n in ALL)
    assert not set(timm.list_models("seqvision_*")) & set(timm.list_models(exclude_filters=["seqvision_*"]))


@pytest.mark.parametrize("name", SMALL)
def test_timm_create_model_forwards_kwargs_and_gives_the_same_model(name):
    m = timm.create_model("seqvision_" + name, num_classes=7, drop_path_rate=0.1)
    ours = seqvision.create_model(name, num_classes=7, drop_path_rate=0.1)
    assert type(m) is type(ours) and m.num_classes == 7 and m.cfg == ours.cfg
    with pytest.raises(TypeError, match="unknown arguments"):
        timm.create_model("seqvision_" + name, wings=2)


@pytest.mark.parametrize("name", ALL)
def test_pretrained_cfg_resolves_to_the_models_own_transform(name):
    m = seqvision.create_model(name)
    cfg = resolve_data_config(model=m)
    c, size = m.cfg.in_chans, m.cfg.img_size[0]
    assert cfg["input_size"] == (c, size, size) and len(cfg["mean"]) == len(cfg["std"]) == c
    assert cfg["crop_pct"] == (1.0 if size < 64 else 0.875)
    assert m.pretrained_cfg["num_classes"] == m.num_classes
    assert m.get_submodule(m.pretrained_cfg["first_conv"]).in_channels == c
    assert m.get_submodule(m.pretrained_cfg["classifier"]) is m.get_classifier()
    assert timm.create_model("seqvision_" + name).pretrained_cfg["input_size"] == (c, size, size)


# Hub folders ------------------------------------------------------------------------------------------

def _trained(name: str) -> torch.nn.Module:
    m = seqvision.create_model(name)
    m.load_state_dict(random_state_dict(m))
    return m.eval()


@pytest.mark.parametrize("name", ["sequencer2d_1m_28", "vit_1m_28", "mixer_1m_28", "resnet_1m_28",
                                  "sequencer2d_300k_28"])
def test_hub_folder_round_trip(name, tmp_path):
    m = _trained(name)
    labels = [f"class {i}" for i in range(m.num_classes)]
    seqvision.save_pretrained(m, tmp_path / "hub", label_names=labels)
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["num_classes"] == m.num_classes and config["label_names"] == labels
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    back = seqvision.create_model(f"local-dir:{tmp_path / 'hub'}").eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
    assert back.label_names == labels
    assert resolve_data_config(model=back)["input_size"] == (1, 28, 28)


@pytest.mark.parametrize("name", ["sequencer2d_s", "sequencer2d_1m_28"])
def test_plain_timm_loads_a_sequencer_hub_folder(name, tmp_path):
    m = _trained(name)
    seqvision.save_pretrained(m, tmp_path / "hub", label_names=[str(i) for i in range(m.num_classes)])
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["architecture"] == "sequencer2d_s"
    torch.manual_seed(0)
    x = torch.randn(1, m.cfg.in_chans, *m.cfg.img_size)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, timm, torch; assert 'seqvision' not in sys.modules; "
            f"m = timm.create_model('local-dir:{tmp_path / 'hub'}', pretrained=True).eval(); "
            "assert 'seqvision' not in sys.modules and type(m).__module__ == 'timm.models.sequencer'; "
            f"torch.save(m(torch.load('{tmp_path / 'x.pt'}', weights_only=True)), '{tmp_path / 'y.pt'}')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), m(x), rtol=1e-4, atol=1e-5)


def test_hf_hub_name_reads_a_hub_shaped_cache_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    m = _trained("vit_1m_28")
    snapshot = tmp_path / "cache" / "models--someone--tiny-vit" / "snapshots" / ("a" * 40)
    seqvision.save_pretrained(m, snapshot, label_names=[str(i) for i in range(10)])
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    x = torch.randn(2, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    code = ("import torch, seqvision; m = seqvision.create_model('hf-hub:someone/tiny-vit').eval(); "
            f"torch.save(m(torch.load('{tmp_path / 'x.pt'}', weights_only=True)), '{tmp_path / 'y.pt'}')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), m(x), rtol=0, atol=0)


def test_train_writes_a_hub_folder_for_its_best_weights(tmp_path):
    from helpers_data import write_image_tree

    from seqvision.config import TrainConfig
    from seqvision.train import train

    tree = write_image_tree(tmp_path / "tree")
    run = tmp_path / "run"
    train(TrainConfig(data=str(tree), output=str(run), model="sequencer2d_300k_28", epochs=1, batch_size=16,
                      workers=0, val_fraction=0.25, warmup_epochs=0.5, mean=(0.3,), std=(0.2,)))
    config = json.loads((run / "hub" / "config.json").read_text())
    assert config["label_names"] == ["cat", "dog", "fox"] and config["num_classes"] == 3
    assert config["pretrained_cfg"]["mean"] == [0.3] and config["pretrained_cfg"]["std"] == [0.2]
    best = seqvision.load_model(run / "best.safetensors").eval()
    hub = seqvision.create_model(f"local-dir:{run / 'hub'}").eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(hub(x), best(x), rtol=0, atol=0)


# Backbones --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sequencer2d_1m_28", "vit_1m_28", "mixer_1m_28", "resnet_1m_28"])
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_features_only_equals_forward_intermediates(name, fmt):
    m = _trained(name)
    n = len(m.feature_info)
    idx = [0, n - 1]
    x = torch.randn(2, 1, *(smallest_input(m) if m.stride > 1 else (28, 28)))
    want = m.forward_intermediates(x, indices=idx, output_fmt=fmt, intermediates_only=True)
    backbone = seqvision.create_model(name, features_only=True, out_indices=idx, output_fmt=fmt)
    backbone.model.load_state_dict(random_state_dict(m), strict=False)
    got = backbone.eval()(x)
    assert len(got) == 2
    for g, w, ch, red in zip(got, want, backbone.feature_info.channels(), backbone.feature_info.reduction()):
        torch.testing.assert_close(g, w)
        assert g.shape[1 if fmt == "NCHW" else -1] == ch
        assert -(-x.shape[-1] // red) == g.shape[-1 if fmt == "NCHW" else -2]  # ceil: a ResNet rounds up


def test_prune_and_parameter_groups():
    seq = _trained("sequencer2d_1m_28")
    assert seq.prune_intermediate_layers([0]) == [0] and len(seq.stages) == 1 and seq.num_classes == 0
    vit = seqvision.create_model("vit_1m_28")
    assert vit.no_weight_decay() == {"pos_embed", "cls_token"}
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(vit, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(vit.pos_embed) in no_decay and id(vit.cls_token) in no_decay
    from timm.models import group_parameters
    for name in ("sequencer2d_1m_28", "vit_1m_28", "mixer_1m_28"):
        m = seqvision.create_model(name)
        groups = group_parameters(m, m.group_matcher())
        assert sum(len(v) for v in groups.values()) == len(list(m.named_parameters()))
        assert len(groups) > 2


# Fashion-MNIST without apt ----------------------------------------------------------------------------

@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server over a folder of Fashion-MNIST-like IDX files."""
    root = write_fashion_like(tmp_path / "mirror")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sums = {p.name: hashlib.sha256(_idx_bytes(p)).hexdigest() for p in root.glob("*.gz")}
    yield f"http://127.0.0.1:{server.server_address[1]}/", sums
    server.shutdown()


def test_download_from_a_mirror_verifies_and_renames(mirror, tmp_path, capsys):
    url, sums = mirror
    out = download_fashion_mnist(tmp_path / "dl", mirrors=("http://127.0.0.1:9/", url), sha256=sums)
    assert sorted(p.name for p in out.iterdir()) == sorted(sums)  # nothing hidden left over
    assert find_fashion_mnist(out) == out
    assert "Fashion-MNIST" in capsys.readouterr().err  # the progress bar


def test_download_with_a_wrong_checksum_is_refused_and_leaves_nothing(mirror, tmp_path):
    url, sums = mirror
    bad = {**sums, "train-labels-idx1-ubyte.gz": "0" * 64}
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*expected 0000"):
        download_fashion_mnist(tmp_path / "dl", mirrors=(url,), sha256=bad)
    assert "train-labels-idx1-ubyte.gz" not in [p.name for p in (tmp_path / "dl").iterdir()]
    assert not list((tmp_path / "dl").glob(".*"))


def test_named_dataset_comes_from_the_cache_folder_without_apt(mirror, tmp_path, monkeypatch):
    import seqvision.data as data

    cache = tmp_path / "cache"
    shutil.copytree(write_fashion_like(tmp_path / "fm"), cache / "fashion-mnist")
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    monkeypatch.setenv("SEQVISION_DATA", str(cache))
    assert find_fashion_mnist() == cache / "fashion-mnist"
    url, sums = mirror  # and with an empty cache, from the mirror into it
    monkeypatch.setenv("SEQVISION_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", (url,))
    monkeypatch.setattr(data, "FASHION_MNIST_SHA256", sums)
    assert find_fashion_mnist() == tmp_path / "empty" / "fashion-mnist"


def test_debian_files_match_the_recorded_checksums():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not folder.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from seqvision.data import FASHION_MNIST_SHA256
    for name, want in FASHION_MNIST_SHA256.items():
        assert hashlib.sha256(_idx_bytes(folder / name)).hexdigest() == want


def test_hub_folder_of_a_custom_config_rebuilds_it_through_timm(tmp_path):
    """A model timm has no class for (a GRU Sequencer of a size no preset has) names our entry point with its
    whole config, so timm.create_model builds that model and not the preset's."""
    m = seqvision.create_model("gru_sequencer2d_1m_28", hidden_sizes=(16, 24), num_classes=4).eval()
    m.load_state_dict(random_state_dict(m))
    seqvision.save_pretrained(m, tmp_path / "hub")
    t = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    assert t.cfg == m.cfg
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(t(x), m(x), rtol=0, atol=0)


def test_version_is_the_projects(capsys):
    import re
    from pathlib import Path

    from seqvision import cli

    want = re.search(r'^version = "(.+)"$', (Path(__file__).parents[1] / "pyproject.toml").read_text(), re.M)[1]
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"seqvision {want}"
