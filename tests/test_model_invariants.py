"""Invariants every registered model must hold, on its cheapest valid input."""
import pytest
import torch

import seqvision
from seqvision.weights import load_model, save_model

from conftest import random_state_dict, smallest_input

ALL = seqvision.list_models()


@pytest.mark.parametrize("name", ALL)
def test_invariants(name, tmp_path):
    model = seqvision.create_model(name, num_classes=7)
    model.load_state_dict(random_state_dict(model, 0.02))
    h, w = smallest_input(model)
    x = torch.randn(2, model.cfg.in_chans, h, w)

    model.train()
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"

    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)

    path = tmp_path / f"{name}.safetensors"
    save_model(model, path)
    loaded = load_model(path).eval()
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    with torch.no_grad():
        assert torch.equal(loaded(x), a)


@pytest.mark.parametrize("name", ALL)
def test_module_api(name):
    model = seqvision.create_model(name).eval()
    h, w = smallest_input(model)
    x = torch.randn(1, model.cfg.in_chans, h, w)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[-1] == model.num_features or feats.shape[1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
        assert torch.equal(model.forward_head(feats), model(x))
        final, inter = model.forward_intermediates(x)
        assert len(inter) == len(model.feature_info)
        for f, info in zip(inter, model.feature_info):
            assert f.shape[1] == info["num_chs"]
        assert torch.equal(final, feats)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (1, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)
