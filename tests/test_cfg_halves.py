"""The identical halves of a CFG batch computed once (``webui.engine.cfg_halves``): the UNet's output
is what it is without, the work before the first cross-attention is done for one half only when the
halves are equal, and anything else runs as before."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from tiny import make_unet

from webui.engine import cfg_halves


def sd_like_unet() -> UNet2DConditionModel:
    """SD 1.x's block order at a tiny size: cross-attention in the first down block."""
    return make_unet(cross_attention_first=True)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cfg_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images with CFG, as the engine builds it: the latents twice, the negative prompt's
    embeddings for the first half, the prompts' for the second."""
    latents = rand(2, 4, 16, 16, seed=seed)
    text = torch.cat([rand(1, 7, 32, seed=seed + 1).repeat(2, 1, 1), rand(2, 7, 32, seed=seed + 2)])
    return torch.cat([latents, latents]), torch.tensor([500.0] * 4), text


def test_targets_are_the_first_resnet_and_self_attention():
    unet = sd_like_unet()
    first = unet.down_blocks[0]
    assert cfg_halves.targets([unet]) == [first.resnets[0], first.attentions[0].transformer_blocks[0].attn1]
    first.resnets[0].forward = lambda *a, **k: None  # a forward of its own already: left alone
    assert cfg_halves.targets([unet]) == [first.attentions[0].transformer_blocks[0].attn1]
    assert cfg_halves.targets([torch.nn.Linear(2, 2)]) == []


def test_a_cfg_batch_gives_the_same_output_with_half_the_work():
    unet = sd_like_unet()
    sample, timestep, text = cfg_batch()
    assert not torch.equal(text[:2], text[2:])  # the halves differ in the text only
    counts: dict[str, int] = {}
    with torch.no_grad():
        expected = unet(sample, timestep, text).sample
        with cfg_halves.shared([unet], counts):
            out = unet(sample, timestep, text).sample
    assert counts["cfg_halves"] == 2  # the ResNet and the self-attention, once each
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not [m for m in unet.modules() if "forward" in m.__dict__]


def test_different_halves_gradients_and_odd_batches_run_as_before():
    unet = sd_like_unet()
    sample, timestep, text = cfg_batch()
    counts: dict[str, int] = {}
    other = sample.clone()
    other[3, 0, 0, 0] += 1e-3  # one value differs: not a CFG batch of equal halves
    with cfg_halves.shared([unet], counts):
        with torch.no_grad():
            unet(other, timestep, text)
            unet(sample[:3], timestep[:3], text[:3])  # odd
        assert counts["cfg_halves"] == 0
        out = unet(sample, timestep, text).sample  # gradients on: as before
        assert counts["cfg_halves"] == 0 and out.requires_grad


def test_the_modules_check_every_batched_input():
    torch.manual_seed(0)
    resnet = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4).eval()
    attention = Attention(query_dim=8, heads=2, dim_head=4).eval()
    x = rand(1, 8, 4, 4, seed=0).repeat(2, 1, 1, 1)
    same, different = rand(1, 16, seed=1).repeat(2, 1), rand(2, 16, seed=2)  # SDXL: the text in temb
    tokens = x.flatten(2).transpose(1, 2)
    counts: dict[str, int] = {}
    with torch.no_grad():
        expected = [resnet(x, same), resnet(x, different), attention(tokens)]
        mask = torch.zeros(2, 16, 16)
        masked = attention(tokens, attention_mask=mask)
        with cfg_halves.shared([_Wrapper(resnet, attention)], counts):
            assert torch.equal(resnet(x, different), expected[1]) and counts["cfg_halves"] == 0
            torch.testing.assert_close(resnet(x, same), expected[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(attention(tokens), expected[2], rtol=1e-6, atol=1e-6)
            assert counts["cfg_halves"] == 2
            torch.testing.assert_close(attention(tokens, attention_mask=mask), masked)
            assert counts["cfg_halves"] == 3  # the mask's halves are equal too


class _Wrapper(torch.nn.Module):
    """A module laid out like a UNet's first down block around ``resnet`` and ``attention``."""

    def __init__(self, resnet: torch.nn.Module, attention: torch.nn.Module) -> None:
        super().__init__()
        block = torch.nn.Module()
        block.resnets = torch.nn.ModuleList([resnet])
        transformer = torch.nn.Module()
        inner = torch.nn.Module()
        inner.attn1 = attention
        transformer.transformer_blocks = torch.nn.ModuleList([inner])
        block.attentions = torch.nn.ModuleList([transformer])
        self.down_blocks = torch.nn.ModuleList([block])


def test_the_forward_is_restored_after_an_error():
    unet = sd_like_unet()
    with pytest.raises(RuntimeError, match="boom"), cfg_halves.shared([unet], {}):
        assert "forward" in unet.down_blocks[0].resnets[0].__dict__
        raise RuntimeError("boom")
    assert not [m for m in unet.modules() if "forward" in m.__dict__]
