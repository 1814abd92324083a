"""Checkpoint round trips in every supported format, and the errors for bad checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from memflow.checkpoint import (
    CheckpointError,
    load_generator_checkpoint,
    load_wan_config,
    load_wan_weights,
    save_generator_checkpoint,
    save_wan_weights,
)
from memflow.config import DiTConfig
from memflow.model import WanDiT

from conftest import TINY, tiny_dit, tiny_prompt


def _out(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([[500.0, 250.0]]), tiny_prompt())


@pytest.mark.parametrize("name,shard", [("w.safetensors", None), ("w.pth", None), ("shards", 20_000)])
def test_wan_weights_round_trip(tmp_path, name, shard):
    src, dst = tiny_dit(seed=0), tiny_dit(seed=1)
    assert not torch.equal(_out(src), _out(dst))
    files = save_wan_weights(src, tmp_path / name, max_shard_bytes=shard)
    if shard:
        assert len(files) > 2 and (tmp_path / name / "diffusion_pytorch_model.safetensors.index.json").exists()
    load_wan_weights(dst, tmp_path / name)
    assert torch.equal(_out(src), _out(dst))


def test_wan_folder_with_config(tmp_path):
    src = tiny_dit()
    save_wan_weights(src, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v",
                                                      **TINY.to_dict()}))
    cfg = load_wan_config(tmp_path)
    assert cfg == TINY
    dst = WanDiT(cfg)
    load_wan_weights(dst, tmp_path)
    assert torch.equal(_out(src), _out(dst))


@pytest.mark.parametrize("entry", ["generator", "generator_ema"])
def test_generator_checkpoint_round_trip(tmp_path, entry):
    src, dst = tiny_dit(seed=0), tiny_dit(seed=1)
    path = save_generator_checkpoint(src, tmp_path / "base.pt", key=entry, extra={"step": 3})
    raw = torch.load(path)
    assert all(k.startswith("model.") for k in raw[entry]) and raw["step"] == 3
    if entry == "generator_ema":  # EMA entries come from FSDP-wrapped modules
        raw[entry] = {k.replace("blocks.", "blocks._fsdp_wrapped_module."): v for k, v in raw[entry].items()}
        torch.save(raw, path)
    assert load_generator_checkpoint(dst, path, use_ema=entry == "generator_ema") == entry
    assert torch.equal(_out(src), _out(dst))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pt"):
        load_generator_checkpoint(tiny_dit(), tmp_path / "nope.pt")


def test_missing_and_unexpected_keys(tmp_path):
    state = {"model." + k: v for k, v in tiny_dit().state_dict().items()}
    del state["model.blocks.1.ffn.2.weight"]
    state["model.blocks.9.extra.weight"] = torch.zeros(1)
    torch.save({"generator": state}, tmp_path / "base.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator_checkpoint(tiny_dit(), tmp_path / "base.pt")
    msg = str(err.value)
    assert "base.pt [generator]" in msg and "blocks.1.ffn.2.weight" in msg and "blocks.9.extra.weight" in msg


def test_wrong_architecture_names_shapes(tmp_path):
    small = WanDiT(DiTConfig(dim=16, ffn_dim=32, num_heads=2, num_layers=2, text_dim=16, text_len=16))
    save_generator_checkpoint(small, tmp_path / "small.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator_checkpoint(tiny_dit(), tmp_path / "small.pt")
    msg = str(err.value)
    assert "small.pt" in msg and "wrong shape" in msg and "expected (32, 16, 1, 2, 2), found (16, 16, 1, 2, 2)" in msg


def test_wrong_entry_and_garbage(tmp_path):
    torch.save({"critic": {}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="expected one of the entries generator"):
        load_generator_checkpoint(tiny_dit(), tmp_path / "c.pt")
    torch.save({"generator": {}}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="no `generator_ema` entry"):
        load_generator_checkpoint(tiny_dit(), tmp_path / "g.pt", use_ema=True)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.safetensors"):
        load_wan_weights(tiny_dit(), tmp_path / "bad.safetensors")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_generator_checkpoint(tiny_dit(), tmp_path / "base.pt")
    assert list(tmp_path.iterdir()) == []
