"""LoRA through peft: save/load, merge, the reference's lora.pt, bad ranks."""
from __future__ import annotations

import pytest
import torch

from memflow.checkpoint import CheckpointError, load_generator_checkpoint, save_generator_checkpoint
from memflow.lora import (
    LoraSettings,
    add_lora,
    load_lora_checkpoint,
    lora_state_dict,
    merge_lora,
    save_lora_checkpoint,
)
from memflow.model import WanDiT

from conftest import tiny_dit, tiny_prompt

SETTINGS = LoraSettings(rank=4, alpha=8)


def _out(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([[500.0, 250.0]]), tiny_prompt())


def _random_lora(seed=0):
    model = add_lora(tiny_dit(), SETTINGS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_targets_every_block_linear_and_starts_as_noop():
    base_out = _out(tiny_dit())
    model = add_lora(tiny_dit(), SETTINGS)
    targets = {k.split(".lora_")[0] for k in lora_state_dict(model)}
    per_block = {t.split(".", 2)[2] for t in targets}
    assert per_block == {f"self_attn.{p}" for p in "qkvo"} | {f"cross_attn.{p}" for p in "qkvo"} | {"ffn.0", "ffn.2"}
    assert len(targets) == 10 * 2
    assert torch.equal(_out(model), base_out)


def test_save_load_identical_and_lora_matters(tmp_path):
    src = _random_lora()
    assert (_out(src) - _out(tiny_dit())).abs().max() > 1e-3
    path = save_lora_checkpoint(src, tmp_path / "lora.pt", step=7)
    raw = torch.load(path)
    assert raw["step"] == 7 and all(k.startswith("base_model.model.blocks.") for k in raw["generator_lora"])
    assert not any(".default." in k for k in raw["generator_lora"])
    dst = add_lora(tiny_dit(), SETTINGS)
    load_lora_checkpoint(dst, path)
    assert torch.equal(_out(src), _out(dst))


def test_merged_equals_unmerged_and_saves_as_base(tmp_path):
    model = _random_lora()
    unmerged = _out(model)
    merged = merge_lora(model)
    assert not lora_state_dict(merged) and "blocks.0.self_attn.q.weight" in merged.state_dict()
    assert (_out(merged) - unmerged).abs().max().item() <= 1e-5
    save_generator_checkpoint(merged, tmp_path / "base.pt")
    plain = tiny_dit(seed=5)
    load_generator_checkpoint(plain, tmp_path / "base.pt")
    assert torch.equal(_out(plain), _out(merged))


def test_rank_mismatch_and_bad_keys(tmp_path):
    save_lora_checkpoint(_random_lora(), tmp_path / "lora.pt")
    other = add_lora(tiny_dit(), LoraSettings(rank=8, alpha=8))
    with pytest.raises(CheckpointError, match=r"file rank 4, configured adapter.rank 8"):
        load_lora_checkpoint(other, tmp_path / "lora.pt")
    torch.save({"generator_lora": {"base_model.model.blocks.0.nope.lora_A.weight": torch.zeros(4, 32)}},
               tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing .*unexpected blocks.0.nope.lora_A.default.weight"):
        load_lora_checkpoint(add_lora(tiny_dit(), SETTINGS), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not supported"):
        LoraSettings.from_config({"type": "dora", "rank": 4})


def test_reference_lora_file_loads(golden_dir):
    from test_golden_parity import GOLDEN_DIT

    model = WanDiT(GOLDEN_DIT)
    load_generator_checkpoint(model, golden_dir / "base.pt")
    model = add_lora(model, LoraSettings.from_config({"type": "lora", "rank": 4, "alpha": 8, "dtype": "bfloat16"}))
    load_lora_checkpoint(model, golden_dir / "lora.pt")
    ref = torch.load(golden_dir / "lora.pt")["generator_lora"]
    ours = model.state_dict()
    assert len(ref) == 2 * 10 * 2
    for key, value in ref.items():
        name = key[len("base_model.model."):].replace(".weight", "").replace("lora_A", "lora_A.default").replace("lora_B", "lora_B.default") + ".weight"
        assert torch.equal(ours[name], value)
