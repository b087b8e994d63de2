"""ViT/DeiT and MLP-Mixer against timm, and the matched-budget small presets."""
import pytest
import torch

import seqvision
from seqvision.flops import count_params
from seqvision.weights import load_state_dict, load_weights, save_model

from conftest import random_state_dict

timm = pytest.importorskip("timm")

PARITY = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
          "vit_small_patch16_224", "vit_base_patch16_224", "mixer_s16_224", "mixer_b16_224"]


@pytest.mark.parametrize("name", PARITY)
def test_logits_equal_timm(name):
    ref = timm.create_model(name).eval()
    sd = random_state_dict(ref, 0.02)
    ref.load_state_dict(sd)
    ours = seqvision.create_model(name).eval()
    load_state_dict(ours, sd)
    assert count_params(ours) == count_params(ref)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_vit_any_size_matches_timm_dynamic_img_size():
    ref = timm.create_model("deit_small_patch16_224", dynamic_img_size=True).eval()
    sd = random_state_dict(ref, 0.02)
    ref.load_state_dict(sd)
    ours = seqvision.create_model("deit_small_patch16_224").eval()
    load_state_dict(ours, sd)
    for size in [(320, 320), (160, 256)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert (ours(x) - ref(x)).abs().max().item() <= 1e-4, size


def test_vit_resamples_position_grid_at_load(tmp_path):
    src = seqvision.create_model("deit_tiny_patch16_224").eval()
    src.load_state_dict(random_state_dict(src, 0.02))
    path = tmp_path / "w.safetensors"
    save_model(src, path)
    big = seqvision.create_model("deit_tiny_patch16_224", img_size=(320, 320)).eval()
    load_weights(big, path)
    assert big.pos_embed.shape == (1, 1 + 20 * 20, 192)
    # the grid is timm's own resampling of the 14x14 grid (not ours compared with ours)
    from timm.layers import resample_abs_pos_embed
    want = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(20, 20), old_size=(14, 14), num_prefix_tokens=1)
    assert torch.allclose(big.pos_embed.detach(), want, atol=1e-6)
    assert not torch.allclose(big.pos_embed[:, 1:21], src.pos_embed[:, 1:21].detach(), atol=1e-3)


def test_mixer_rejects_other_sizes():
    model = seqvision.create_model("mixer_1m_28")
    with pytest.raises(ValueError, match="only 28x28 inputs.*got 56x56"):
        model(torch.randn(1, 1, 56, 56))


@pytest.mark.parametrize("budget", ["1m", "5m"])
@pytest.mark.parametrize("size", [28, 32])
def test_small_presets_match_budgets(budget, size):
    counts = {fam: count_params(seqvision.create_model(f"{fam}_{budget}_{size}"))
              for fam in ("sequencer2d", "vit", "mixer")}
    target = {"1m": 1e6, "5m": 5e6}[budget]
    assert max(counts.values()) <= 1.1 * min(counts.values()), counts
    assert all(0.9 * target <= c <= 1.1 * target for c in counts.values()), counts
    chans = 1 if size == 28 else 3
    for fam in counts:
        model = seqvision.create_model(f"{fam}_{budget}_{size}").eval()
        with torch.no_grad():
            assert model(torch.randn(2, chans, size, size)).shape == (2, 10)
