"""Sequencer-specific behaviour: sizes, channels, checkpointing, init, drop-path ramp, intermediates."""
import math

import pytest
import torch

import seqvision
from seqvision.layers import drop_path_rates

from conftest import random_state_dict


@pytest.fixture(scope="module")
def tiny():
    model = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1), num_classes=10).eval()
    model.load_state_dict(random_state_dict(model))
    return model


@pytest.mark.parametrize("size", [(14, 14), (28, 42), (56, 28)])
def test_any_multiple_of_stride(tiny, size):
    out = tiny.forward_features(torch.randn(1, 3, *size))
    assert out.shape == (1, size[0] // 14, size[1] // 14, 384)


@pytest.mark.parametrize("shape,match", [
    ((3, 28, 28), "4-D"),
    ((1, 1, 28, 28), "expected 3 input channels, got 1"),
    ((1, 3, 30, 28), "multiples of the model's stride 14, got 30x28"),
])
def test_bad_input_raises_before_any_layer(tiny, shape, match):
    calls = []
    handle = tiny.stem.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            tiny(torch.randn(*shape))
    finally:
        handle.remove()
    assert not calls


def test_grey_input():
    model = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1), in_chans=1, num_classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_grad_checkpointing_same_outputs_and_grads(tiny):
    model = seqvision.create_model("sequencer2d_s", layers=(2, 1, 1, 1), num_classes=10, drop_path_rate=0.2)
    model.load_state_dict(random_state_dict(model))
    x = torch.randn(2, 3, 28, 28)

    def run(flag):
        model.set_grad_checkpointing(flag)
        model.zero_grad()
        torch.manual_seed(3)  # the same drop-path draws on both runs
        out = model.train()(x)
        out.sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_a, grads_a = run(False)
    out_b, grads_b = run(True)
    assert torch.allclose(out_a, out_b, atol=1e-6)
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n


def test_intermediates_indices(tiny):
    x = torch.randn(1, 3, 28, 28)
    feats = tiny.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NHWC")
    assert [f.shape for f in feats] == [(1, 2, 2, 384)] * 2
    feats = tiny.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert feats[0].shape == (1, 192, 4, 4)
    assert [i["reduction"] for i in tiny.feature_info] == [7, 14, 14, 14]


def test_drop_path_ramp_is_linear_over_all_blocks():
    rates = drop_path_rates(0.3, (4, 3, 8, 3))
    flat = [r for stage in rates for r in stage]
    assert len(flat) == 18 and flat[0] == 0.0 and math.isclose(flat[-1], 0.3)
    assert all(math.isclose(b - a, 0.3 / 17) for a, b in zip(flat, flat[1:]))
    model = seqvision.create_model("sequencer2d_s", drop_path_rate=0.3)
    got = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert got == flat


def test_reference_init():
    model = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1))
    assert not model.head.fc.weight.any() and not model.head.fc.bias.any()
    block = model.stages[0].blocks[0]
    assert torch.equal(block.norm1.weight, torch.ones(192))
    bound = 1 / math.sqrt(48)
    lstm = block.rnn_tokens.rnn_v
    assert lstm.weight_hh_l0.abs().max() <= bound and lstm.bias_ih_l0.abs().max() > bound / 2
    assert not block.rnn_tokens.fc.bias.any()
    assert 0 < block.mlp_channels.fc1.bias.abs().max() < 1e-4
    conv = model.stem.proj.weight
    std = math.sqrt(1 / conv[0].numel())
    assert conv.abs().max() <= 2 * std / 0.87962566103423978 + 1e-6


def test_vanilla_pos_embed_resamples():
    model = seqvision.create_model("v_sequencer_s_pe", layers=(1, 1, 1, 1)).eval()
    assert model.absolute_pos_embed.shape == (1, 16, 16, 384)
    assert model(torch.randn(1, 3, 28, 42)).shape == (1, 1000)


def test_registry_errors():
    with pytest.raises(KeyError, match="sequencer2d_s"):
        seqvision.create_model("sequencer2d_x")
    with pytest.raises(TypeError, match="num_classes"):
        seqvision.create_model("sequencer2d_s", num_clases=3)
    assert "sequencer2d_l_392" in seqvision.list_models("sequencer2d_l*")
    assert seqvision.list_models("v_sequencer_s*") == ["v_sequencer_s", "v_sequencer_s_h", "v_sequencer_s_pe"]
    with pytest.raises(ValueError, match="without fc"):
        seqvision.create_model("sequencer2d_s", with_fc=False, union="add")
