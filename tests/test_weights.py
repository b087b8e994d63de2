"""Weight files: formats, strictness, head dropping, conversion, and hostile or broken files."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import seqvision
from seqvision import cli
from seqvision.weights import WeightsError, load_model, load_weights, read_metadata, save_model, to_authors

from conftest import random_state_dict

SMALL = dict(layers=(1, 1, 1, 1))


@pytest.fixture()
def trained():
    model = seqvision.create_model("sequencer2d_s", **SMALL).eval()
    model.load_state_dict(random_state_dict(model))
    return model


def logits(model, size=(28, 28)):
    torch.manual_seed(5)
    with torch.no_grad():
        return model.eval()(torch.randn(2, model.cfg.in_chans, *size))


@pytest.mark.parametrize("fmt", ["timm.pth", "authors.pth", "timm.safetensors", "authors.safetensors", "wrapped.pth"])
def test_load_every_format(trained, tmp_path, fmt):
    sd = {k: v.contiguous() for k, v in trained.state_dict().items()}
    if fmt.startswith("authors"):
        sd = to_authors(sd, SMALL["layers"])
    path = tmp_path / fmt
    if fmt.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save({"model": sd, "epoch": 3} if fmt.startswith("wrapped") else sd, path)
    model = seqvision.create_model("sequencer2d_s", pretrained=str(path), **SMALL)
    assert torch.equal(logits(model), logits(trained))


def test_missing_and_misshaped_keys_are_listed(trained, tmp_path):
    sd = dict(trained.state_dict())
    sd.pop("norm.weight")
    sd["stem.proj.bias"] = torch.zeros(5)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, path)
    with pytest.raises(WeightsError) as e:
        load_weights(seqvision.create_model("sequencer2d_s", **SMALL), path)
    msg = str(e.value)
    assert str(path) in msg and "norm.weight" in msg and "extra.weight" in msg
    assert "stem.proj.bias: file (5,) vs model (192,)" in msg


def test_num_classes_drops_head_only_on_request(trained, tmp_path):
    path = tmp_path / "w.safetensors"
    save_model(trained, path)
    with pytest.raises(WeightsError, match="head.fc.weight"):
        load_weights(seqvision.create_model("sequencer2d_s", num_classes=10, **SMALL), path)
    model = seqvision.create_model("sequencer2d_s", pretrained=str(path), num_classes=10, **SMALL)
    assert not model.head.fc.weight.any()
    assert torch.equal(model.stem.proj.weight, trained.stem.proj.weight)


def test_in_chans_adapts_stem_on_request(trained, tmp_path):
    path = tmp_path / "w.safetensors"
    save_model(trained, path)
    grey = seqvision.create_model("sequencer2d_s", pretrained=str(path), in_chans=1, **SMALL)
    assert torch.allclose(grey.stem.proj.weight, trained.stem.proj.weight.sum(1, keepdim=True))
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(grey.eval()(x), trained(x.expand(1, 3, 28, 28)), atol=1e-5)


def test_truncated_safetensors(trained, tmp_path):
    path = tmp_path / "w.safetensors"
    save_model(trained, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_weights(trained, path)
    with pytest.raises(WeightsError, match=str(path)):
        load_model(path)


def test_integer_and_nan_tensors_are_refused_by_key(trained, tmp_path):
    sd = {k: v.clone() for k, v in trained.state_dict().items()}
    sd["stem.proj.weight"] = sd["stem.proj.weight"].to(torch.int8)
    sd["head.fc.bias"][0] = float("nan")
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError) as e:
        load_weights(trained, path)
    msg = str(e.value)
    assert str(path) in msg and "stem.proj.weight: file torch.int8 vs model torch.float32" in msg
    assert "NaN or infinite values (1): head.fc.bias" in msg


def test_zero_byte_torch_file_names_itself(trained, tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match=f"{path}: refused to load"):
        load_weights(trained, path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"stem.proj.weight": _Payload(marker)}, f)
    torch.save({"x": _Payload(marker)}, tmp_path / "evil_zip.pth")
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(WeightsError, match="weights_only=True"):
            seqvision.create_model("sequencer2d_s", pretrained=str(p), **SMALL)
    assert not marker.exists()


def test_metadata_holds_config(trained, tmp_path):
    path = tmp_path / "w.safetensors"
    save_model(trained, path)
    meta = read_metadata(path)
    assert meta["family"] == "sequencer" and '"layers": [1, 1, 1, 1]' in meta["config"]


def test_hub_download_path(trained, tmp_path, monkeypatch):
    """pretrained=True fetches the preset's hub file; offline the test serves a file it wrote itself."""
    hub = pytest.importorskip("huggingface_hub")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, path)
    asked = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo, filename: asked.append((repo, filename)) or str(path))
    model = seqvision.create_model("sequencer2d_s", pretrained=True, **SMALL)
    assert asked == [("timm/sequencer2d_s.in1k", "model.safetensors")]
    assert torch.equal(logits(model), logits(trained))
    with pytest.raises(WeightsError, match="no released weights"):
        seqvision.create_model("gru_sequencer2d_s", pretrained=True)


def test_cli_convert_round_trip(trained, tmp_path, capsys):
    ours = tmp_path / "ours.safetensors"
    save_model(trained, ours)
    back = tmp_path / "back.pth"
    assert cli.main(["convert", str(ours), str(back), "--to", "authors"]) == 0
    again = tmp_path / "again.safetensors"
    assert cli.main(["convert", str(back), str(again)]) == 1
    assert "--model" in capsys.readouterr().err
    model = seqvision.create_model("sequencer2d_s", pretrained=str(back), **SMALL)
    assert torch.equal(logits(model), logits(trained))


def test_cli_convert_named_model(tmp_path):
    model = seqvision.create_model("sequencer2d_s").eval()
    src = tmp_path / "authors.pth"
    torch.save(to_authors(random_state_dict(model), model.cfg.layers), src)
    dst = tmp_path / "s.safetensors"
    assert cli.main(["convert", str(src), str(dst), "--model", "sequencer2d_s"]) == 0
    loaded = load_model(dst)
    load_weights(model, src)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("name,classes", [("vit_1m_28", 10), ("mixer_1m_28", 7), ("deit_tiny_patch16_224", 1000)])
def test_cli_convert_round_trips_vit_and_mixer(name, classes, tmp_path, capsys):
    """A timm-keyed torch file of a ViT or a Mixer (their head is head.weight) to a seqvision file and back."""
    model = seqvision.create_model(name, num_classes=classes).eval()
    model.load_state_dict(random_state_dict(model))
    src, dst = tmp_path / "timm.pth", tmp_path / "ours.safetensors"
    torch.save(model.state_dict(), src)
    assert cli.main(["convert", str(src), str(dst), "--model", name]) == 0
    loaded = load_model(dst)
    assert loaded.num_classes == classes
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert cli.main(["convert", str(dst), str(tmp_path / "a.pth"), "--to", "authors"]) == 1
    assert "authors' format is Sequencer's" in capsys.readouterr().err


def test_cli_models_table(capsys):
    assert cli.main(["models", "sequencer2d_s", "--csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "model,family,input,params,gmacs"
    assert out[1] == "sequencer2d_s,sequencer,3x224x224,27651688,8.334"
