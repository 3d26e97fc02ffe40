"""``model.embedding_injection``: MONAI's additive embedding vs ADM's AdaGN scale-shift."""

import pytest
import torch

from medsynth.diffusion.unet import ScaleShiftResnetBlock, UNetConfig, build_unet
from medsynth.protocol import ProtocolError, parse_protocol
from medsynth.runfolder import stage_inputs
from medsynth.training.checkpoint import load_snapshot
from medsynth.training.loop import train

TINY = dict(channels=[16, 32], attention_levels=[False, True], num_head_channels=16)
BASE = "dataset: {kind: phantoms}\n"


def _models():
    """An add and a scale_shift model with equal weights, every embedding projection zeroed."""
    add = build_unet(UNetConfig(**TINY))
    ss = build_unet(UNetConfig(**TINY, embedding_injection="scale_shift"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs = dict(ss.named_parameters())
        for name, p in add.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if "time_emb_proj" in name:
                p.zero_()
                theirs[name].zero_()
            else:
                theirs[name].copy_(p)
    return add.eval(), ss.eval()


def _forward(model, labels):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 16, 16, generator=g).expand(len(labels), -1, -1, -1)  # one image
    t = torch.full((len(labels),), 500)
    with torch.no_grad():
        return model(x, t, class_labels=torch.tensor(labels))


def test_scale_shift_without_a_condition_is_the_plain_block_and_with_one_conditions():
    add, ss = _models()
    blocks = [m for m in ss.modules() if "ResnetBlock" in type(m).__name__]
    assert blocks and all(isinstance(b, ScaleShiftResnetBlock) for b in blocks)
    assert all(b.time_emb_proj.out_features == 2 * b.out_channels for b in blocks)
    # s = b = 0: the AdaGN block computes exactly MONAI's block with a zero bias.
    torch.testing.assert_close(_forward(ss, [0, 1]), _forward(add, [0, 1]), rtol=0, atol=1e-5)
    with torch.no_grad():
        for b in blocks:
            b.time_emb_proj.weight.normal_(0, 0.5)
    # Now the class reaches every block: the same noise under two labels gives two outputs.
    out = _forward(ss, [0, 1, 0])
    assert (out[0] - out[1]).abs().mean() > 1e-3
    torch.testing.assert_close(out[0], out[2])


def test_default_keeps_every_hash_and_the_other_value_changes_the_train_stage():
    p = parse_protocol(BASE)
    assert p.model.embedding_injection == "add"
    assert "embedding_injection" not in UNetConfig().to_dict()  # old snapshot configs unchanged
    same = parse_protocol(BASE, ["model.embedding_injection=add"])
    other = parse_protocol(BASE, ["model.embedding_injection=scale_shift"])
    assert p.sha256() == same.sha256() != other.sha256()
    a, b = stage_inputs(p), stage_inputs(other)
    assert a["ingest"] == b["ingest"] and a["train"] != b["train"]
    with pytest.raises(ProtocolError, match="scale_shift"):
        parse_protocol(BASE, ["model.embedding_injection=adagn"])


def test_scale_shift_trains_and_loads_back_from_its_snapshot(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(16, 1, 16, 16, generator=g) * 2 - 1, torch.arange(16) % 2
    cfg = UNetConfig(**TINY, embedding_injection="scale_shift")
    snap = train(
        images,
        labels,
        ["a", "b"],
        tmp_path,
        unet=cfg,
        max_steps=3,
        batch_size=8,
        warmup_steps=1,
        checkpoint_every_steps=3,
        progress=False,
    )
    model, _, config = load_snapshot(snap)
    assert config["unet"]["embedding_injection"] == "scale_shift"
    assert any(isinstance(m, ScaleShiftResnetBlock) for m in model.modules())
    assert not torch.equal(_forward(model, [0]), _forward(model, [1]))


def test_a_scale_shift_block_computes_adagn_after_its_second_norm():
    torch.manual_seed(0)
    model = build_unet(UNetConfig(**TINY, embedding_injection="scale_shift"))
    block = next(b for b in model.modules() if isinstance(b, ScaleShiftResnetBlock))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # conv2 starts at zero: make every term count
        x = torch.randn(2, block.channels, 8, 8)
        emb = torch.randn(2, block.time_emb_proj.in_features)
        silu = torch.nn.functional.silu
        scale, shift = block.time_emb_proj(silu(emb))[:, :, None, None].chunk(2, 1)
        h = block.norm2(block.conv1(silu(block.norm1(x)))) * (1 + scale) + shift
        want = block.skip_connection(x) + block.conv2(silu(h))
        torch.testing.assert_close(block(x, emb), want)
