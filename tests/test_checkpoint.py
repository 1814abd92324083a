"""Checkpoint round trips in every supported format, and the errors for bad checkpoints."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIT, fixed_forward, tiny_dit
from reference_files import save_generator_checkpoint, save_wan_weights

from memflow.checkpoint import (
    CheckpointError,
    load_generator_checkpoint,
    load_wan_config,
    load_wan_weights,
)
from memflow.config import DiTConfig
from memflow.model import WanDiT

NARROW = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32)


forward = fixed_forward


@pytest.fixture(scope="module")
def source() -> tuple[WanDiT, torch.Tensor]:
    model = tiny_dit(GOLDEN_DIT, 0)
    return model, forward(model)


def assert_loaded(model: WanDiT, reference: torch.Tensor) -> None:
    assert torch.equal(forward(model), reference)


def test_fresh_model_differs(source):
    assert not torch.equal(forward(tiny_dit(GOLDEN_DIT, 1)), source[1])


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "w.pt"])
def test_wan_weights_single_file_round_trip(tmp_path, source, name):
    written = save_wan_weights(source[0], tmp_path / name)
    assert written == [tmp_path / name] and [p.name for p in tmp_path.iterdir()] == [name]
    dst = tiny_dit(GOLDEN_DIT, 1)
    load_wan_weights(dst, tmp_path / name)
    assert_loaded(dst, source[1])


def test_wan_weights_sharded_round_trip(tmp_path, source):
    written = save_wan_weights(source[0], tmp_path, max_shard_size=64_000)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert written[-1] == index and len(shards) > 2 and set(written) == {*shards, index}
    assert set(json.loads(index.read_text())["weight_map"]) == set(source[0].state_dict())
    for target in (tmp_path, index):  # the folder, or the index file itself
        dst = tiny_dit(GOLDEN_DIT, 1)
        load_wan_weights(dst, target)
        assert_loaded(dst, source[1])


def test_resave_replaces_the_other_layout(tmp_path, source):
    save_wan_weights(tiny_dit(GOLDEN_DIT, 2), tmp_path, max_shard_size=64_000)
    save_wan_weights(source[0], tmp_path)  # now a single file: the old shards must go
    assert [p.name for p in tmp_path.iterdir()] == ["diffusion_pytorch_model.safetensors"]
    dst = tiny_dit(GOLDEN_DIT, 1)
    load_wan_weights(dst, tmp_path)
    assert_loaded(dst, source[1])


def test_missing_shard_is_named(tmp_path, source):
    save_wan_weights(source[0], tmp_path, max_shard_size=64_000)
    shard = sorted(tmp_path.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard .*{shard.name} listed in .*index.json not found"):
        load_wan_weights(tiny_dit(GOLDEN_DIT, 1), tmp_path)


def test_wan_folder_config_and_weights(tmp_path, source):
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
              **{k: v for k, v in GOLDEN_DIT.to_dict().items() if k not in ("patch_size", "qk_norm")}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_wan_weights(source[0], tmp_path)
    assert load_wan_config(tmp_path) == GOLDEN_DIT
    dst = WanDiT(load_wan_config(tmp_path)).eval()
    load_wan_weights(dst, tmp_path)
    assert_loaded(dst, source[1])


def test_wan_config_defaults_are_the_constructor_defaults(tmp_path):
    # The real Wan2.1-T2V-1.3B config.json: no patch_size, text_dim, qk_norm, cross_attn_norm.
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
        "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
        "num_layers": 30, "out_dim": 16, "text_len": 512}))
    cfg = load_wan_config(tmp_path)
    assert cfg == DiTConfig() and cfg.patch_size == (1, 2, 2) and cfg.text_dim == 4096
    assert cfg.qk_norm and cfg.cross_attn_norm


@pytest.mark.parametrize("values,message", [
    ({"model_type": "i2v", "dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2},
     "model_type 'i2v' is not supported"),
    ({"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2}, "model_type None is not supported"),
    ({"_class_name": "WanTransformer3DModel", "model_type": "t2v"}, "not the original Wan2.1 layout"),
    ({"model_type": "t2v", "dim": 64}, "lacks ffn_dim, num_heads, num_layers"),
    ({"model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 3, "num_layers": 2},
     "not divisible by num_heads"),
])
def test_wan_config_errors(tmp_path, values, message):
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match=message) as err:
        load_wan_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_wan_config_missing(tmp_path):
    with pytest.raises(CheckpointError, match=f"folder not found: {tmp_path / 'nope'}"):
        load_wan_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"model config not found: {tmp_path / 'config.json'}"):
        load_wan_config(tmp_path)
    with pytest.raises(CheckpointError, match=f"no DiT weights in {tmp_path}"):
        load_wan_weights(tiny_dit(GOLDEN_DIT, 1), tmp_path)


def _fsdp_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EMA keys as the reference's FSDP-wrapped blocks name them."""
    return {k.replace("model.blocks.", "model._fsdp_wrapped_module.blocks._fsdp_wrapped_module.", 1): v
            for k, v in state.items()}


@pytest.mark.parametrize("entry", ["generator", "generator_ema", "model"])
def test_generator_checkpoint_round_trip(tmp_path, source, entry):
    path = save_generator_checkpoint(source[0], tmp_path / "base.pt", key=entry, extra={"step": 3})
    raw = torch.load(path, weights_only=True)
    assert list(raw) == [entry, "step"] and all(k.startswith("model.") for k in raw[entry])
    assert set(raw[entry]) == {"model." + k for k in source[0].state_dict()}
    if entry == "generator_ema":
        raw[entry] = _fsdp_keys(raw[entry])
        assert any("_fsdp_wrapped_module." in k for k in raw[entry])
        torch.save(raw, path)
    dst = tiny_dit(GOLDEN_DIT, 1)
    result = load_generator_checkpoint(dst, path, use_ema=entry == "generator_ema")
    assert result.entry == entry and result.step == 3
    assert result.missing_keys == () and result.unexpected_keys == ()
    assert_loaded(dst, source[1])


def test_partial_ema_loads_non_strictly_and_reports(tmp_path, source, caplog):
    state = {"model." + k: v for k, v in source[0].state_dict().items()}
    del state["model.head.head.weight"]
    state["model.ema_counter"] = torch.zeros(1)
    torch.save({"generator": state, "generator_ema": _fsdp_keys(state)}, tmp_path / "base.pt")
    dst = tiny_dit(GOLDEN_DIT, 1)
    kept = dst.head.head.weight.clone()
    with caplog.at_level(logging.WARNING, logger="memflow.checkpoint"):
        result = load_generator_checkpoint(dst, tmp_path / "base.pt", use_ema=True)
    assert result.missing_keys == ("head.head.weight",) and result.unexpected_keys == ("ema_counter",)
    assert "head.head.weight" in caplog.text and "ema_counter" in caplog.text
    assert torch.equal(dst.head.head.weight, kept)
    assert torch.equal(dst.blocks[1].ffn[2].weight, source[0].blocks[1].ffn[2].weight)


def test_missing_file_names_the_path(tmp_path):
    for load in (load_generator_checkpoint, load_wan_weights):
        with pytest.raises(CheckpointError, match=f"not found: {tmp_path / 'nope.pt'}"):
            load(tiny_dit(GOLDEN_DIT, 1), tmp_path / "nope.pt")


def test_missing_and_unexpected_keys(tmp_path, source):
    state = {"model." + k: v for k, v in source[0].state_dict().items()}
    del state["model.blocks.1.ffn.2.weight"]
    state["model.blocks.9.extra.weight"] = torch.zeros(1)
    torch.save({"generator": state}, tmp_path / "base.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "base.pt")
    msg = str(err.value)
    assert f"{tmp_path / 'base.pt'} (entry 'generator') does not fit the model" in msg
    assert "1 missing key(s): blocks.1.ffn.2.weight" in msg
    assert "1 unexpected key(s): blocks.9.extra.weight" in msg


def test_wrong_architecture_names_shapes(tmp_path):
    save_generator_checkpoint(tiny_dit(NARROW, 0), tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "narrow.pt")
    msg = str(err.value)
    assert "narrow.pt (entry 'generator')" in msg and "tensor(s) with the wrong shape" in msg
    assert "patch_embedding.weight: model expects [64, 16, 1, 2, 2], file has [32, 16, 1, 2, 2]" in msg
    assert ("wrong architecture: the file is dim 32, ffn_dim 64, text_dim 32, 2 blocks; "
            "the model is dim 64, ffn_dim 128, text_dim 32, 2 blocks") in msg
    # Shapes are checked even by the non-strict EMA load.
    save_generator_checkpoint(tiny_dit(NARROW, 0), tmp_path / "ema.pt", key="generator_ema")
    with pytest.raises(CheckpointError, match="model expects \\[64, 64\\], file has \\[32, 32\\]"):
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "ema.pt", use_ema=True)
    save_wan_weights(tiny_dit(NARROW, 0), tmp_path / "narrow.safetensors")
    expected = "narrow.safetensors does not fit the model:\n  wrong architecture"
    with pytest.raises(CheckpointError, match=expected):
        load_wan_weights(tiny_dit(GOLDEN_DIT, 1), tmp_path / "narrow.safetensors")


def test_wrong_entry(tmp_path, source):
    torch.save({"critic": {}, "step": 1}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt has none of the entries generator, generator_ema, "
                                              "model \\(entries: critic, step\\)"):
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "c.pt")
    save_generator_checkpoint(source[0], tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="g.pt has no 'generator_ema' entry .*use_ema=False"):
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "g.pt", use_ema=True)
    with pytest.raises(CheckpointError, match="g.pt is not a flat state dict.*load_generator_checkpoint"):
        load_wan_weights(tiny_dit(GOLDEN_DIT, 1), tmp_path / "g.pt")


def test_unreadable_files(tmp_path):
    for name in ("bad.safetensors", "bad.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.safetensors"):
        load_wan_weights(tiny_dit(GOLDEN_DIT, 1), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.pt"):
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "bad.pt")


def test_pickled_objects_need_the_trust_opt_in(tmp_path, source, caplog):
    """A checkpoint holding pickled objects is refused (the message names the file, the types
    and the opt-in); trusted by the loader's argument (no process-wide switch), it loads after a
    warning, and the next load without it refuses again."""
    save_generator_checkpoint(source[0], tmp_path / "base.pt", extra={"args": argparse.Namespace(lr=1)})
    with pytest.raises(CheckpointError, match=r"base\.pt holds pickled objects \(argparse\.Namespace\).*trust_checkpoints"):
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "base.pt")
    dst = tiny_dit(GOLDEN_DIT, 1)
    with caplog.at_level(logging.WARNING, logger="memflow.checkpoint"):
        load_generator_checkpoint(dst, tmp_path / "base.pt", trust=True)
    assert "trust_checkpoints" in caplog.text and "base.pt" in caplog.text
    assert_loaded(dst, source[1])
    with pytest.raises(CheckpointError, match="holds pickled objects"):
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "base.pt")


class _Payload:
    """Unpickling this runs a shell command that creates a file (a stand-in for an attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, source):
    """A generator_ckpt or lora_ckpt whose pickle calls os.system: refused, nothing executed."""
    from memflow.lora import load_lora_checkpoint

    marker = tmp_path / "pwned"
    for name in ("base.pt", "lora.pt"):
        torch.save({"generator": source[0].state_dict(), "generator_lora": {},
                    "x": _Payload(marker)}, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"base\.pt holds pickled objects .*system.*trust_checkpoints"):
        load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match=r"lora\.pt holds pickled objects"):
        load_lora_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "lora.pt")
    assert not marker.exists()


def test_failed_write_leaves_nothing(tmp_path, source, monkeypatch):
    save_generator_checkpoint(source[0], tmp_path / "base.pt", extra={"step": 1})

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="disk full"):
        save_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "base.pt", extra={"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["base.pt"]
    monkeypatch.undo()
    assert load_generator_checkpoint(tiny_dit(GOLDEN_DIT, 1), tmp_path / "base.pt").step == 1


@pytest.mark.parametrize(
    "state, message",
    [
        ({"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}, "f.pt: unexpected key 'C' for a tiny model"),
        ({"a": torch.zeros(2), "b": torch.zeros(4)}, "f.pt: key 'B' has shape (4,) but the tiny config expects (3,)"),
        ({"a": torch.zeros(2)}, "f.pt: missing key 'B'"),
    ],
)
def test_state_fit_check_names_the_first_bad_key_in_the_files_naming(state, message):
    from memflow.checkpoint import check_state_fits

    expected = {"a": torch.Size([2]), "b": torch.Size([3])}
    with pytest.raises(ValueError) as err:
        check_state_fits(state, expected, "f.pt", model="a tiny model", config="tiny config",
                         shown_name=str.upper)
    assert str(err.value) == message
    check_state_fits({"a": torch.zeros(2), "b": torch.zeros(3)}, expected, "f.pt",
                     model="a tiny model", config="tiny config")
