"""LoRA through peft: targets, save/load, merge, the reference's lora.pt, bad files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIT, fixed_forward, tiny_dit
from reference_files import save_generator_checkpoint, save_lora_checkpoint

from config.checker import check_section
from config.schema import Adapter, InferenceConfig, settings_from_config
from memflow.checkpoint import CheckpointError, load_generator_checkpoint
from memflow.errors import InputError
from memflow.lora import (
    LoraSettings,
    add_lora,
    load_lora_checkpoint,
    lora_state_dict,
    merge_lora,
)
from memflow.model import WanDiT

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
SETTINGS = LoraSettings(rank=4, alpha=8)
BLOCK_LINEARS = {f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"} | {"ffn.0", "ffn.2"}


forward = fixed_forward


@torch.no_grad()
def random_lora(seed: int = 0, settings: LoraSettings = SETTINGS) -> WanDiT:
    """The base model of seed 0 with a non-zero random adapter (B = 0 would be a no-op)."""
    model = add_lora(tiny_dit(GOLDEN_DIT), settings)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_targets_every_block_linear_in_place():
    base_out = forward(tiny_dit(GOLDEN_DIT))
    model = add_lora(tiny_dit(GOLDEN_DIT), SETTINGS)
    assert type(model) is WanDiT
    names = dict(model.named_parameters())
    assert "blocks.0.self_attn.q.base_layer.weight" in names
    assert names["blocks.1.ffn.0.lora_A.default.weight"].shape == (4, 64)
    assert names["blocks.1.ffn.0.lora_B.default.weight"].shape == (128, 4)
    adapted = {k.split(".lora_")[0] for k in names if ".lora_" in k}
    assert adapted == {f"blocks.{i}.{t}" for i in range(2) for t in BLOCK_LINEARS}
    assert {k for k, p in names.items() if p.requires_grad} == {k for k in names if ".lora_" in k}
    assert torch.equal(forward(model), base_out)  # B starts at zero


def _adapter(section: dict) -> LoraSettings:
    """The LoRA settings of a reference `adapter:` section, checked as a config loads it."""
    check_section({"adapter": section}, InferenceConfig)
    return settings_from_config(section, Adapter).lora_settings()


def test_settings_from_reference_config():
    s = _adapter({"type": "lora", "rank": 256, "alpha": 256, "dropout": 0.0,
                  "dtype": "bfloat16", "verbose": True, "apply_to_critic": True})
    assert s == LoraSettings(rank=256, alpha=256.0) and s.scaling == 1.0
    assert _adapter({"rank": 8, "alpha": None}).alpha == 8.0
    assert _adapter({}) == LoraSettings(rank=16, alpha=16.0)  # the reference's defaults
    with pytest.raises(InputError, match="`adapter.type` must be lora; got 'dora'"):
        _adapter({"type": "dora", "rank": 4})
    with pytest.raises(InputError, match="unknown config key `adapter.aplha`; did you mean `adapter.alpha`"):
        _adapter({"rank": 4, "aplha": 8})
    with pytest.raises(InputError, match=r"`adapter.dropout` must be in \[0, 1\), got 1.0"):
        _adapter({"dropout": 1.0})
    with pytest.raises(ValueError, match="'ffn.1'.* match no nn.Linear"):
        add_lora(tiny_dit(GOLDEN_DIT), LoraSettings(rank=4, alpha=4, target_modules=("ffn.0", "ffn.1")))


def test_save_load_identical_and_lora_matters(tmp_path):
    src = random_lora()
    out = forward(src)
    assert (out - forward(tiny_dit(GOLDEN_DIT))).abs().max() > 1e-2
    path = save_lora_checkpoint(src, tmp_path / "lora.pt", critic=random_lora(seed=1), step=7)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["generator_lora", "critic_lora", "step"] and raw["step"] == 7
    assert len(raw["generator_lora"]) == 2 * 10 * 2
    assert "base_model.model.blocks.0.self_attn.q.lora_A.weight" in raw["generator_lora"]
    assert not torch.equal(raw["critic_lora"]["base_model.model.blocks.0.ffn.0.lora_B.weight"],
                           raw["generator_lora"]["base_model.model.blocks.0.ffn.0.lora_B.weight"])
    dst = add_lora(tiny_dit(GOLDEN_DIT), SETTINGS)
    result = load_lora_checkpoint(dst, path)
    assert result.entry == "generator_lora" and result.step == 7
    assert torch.equal(forward(dst), out)


def test_key_forms_are_normalised(tmp_path):
    """A bare state dict with FSDP parts, no peft prefix and the adapter name still loads."""
    src = random_lora()
    state = {k.replace("base_model.model.blocks.", "_fsdp_wrapped_module.blocks.")
              .replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in lora_state_dict(src).items()}
    torch.save(state, tmp_path / "bare.pt")
    dst = add_lora(tiny_dit(GOLDEN_DIT), SETTINGS)
    assert load_lora_checkpoint(dst, tmp_path / "bare.pt").entry is None
    assert torch.equal(forward(dst), forward(src))


def test_rank_mismatch_is_explained(tmp_path):
    save_lora_checkpoint(random_lora(), tmp_path / "lora.pt")
    other = add_lora(tiny_dit(GOLDEN_DIT), LoraSettings(rank=8, alpha=8))
    with pytest.raises(CheckpointError) as err:
        load_lora_checkpoint(other, tmp_path / "lora.pt")
    msg = str(err.value)
    assert f"{tmp_path / 'lora.pt'} (entry 'generator_lora') does not fit the model" in msg
    assert "blocks.0.self_attn.q.lora_A.weight: model expects [8, 64], file has [4, 64]" in msg
    assert "the adapter config has rank 8 (alpha 8), the file holds rank 4" in msg


def test_missing_and_unexpected_lora_keys(tmp_path):
    state = lora_state_dict(random_lora())
    del state["base_model.model.blocks.1.ffn.2.lora_B.weight"]
    state["base_model.model.blocks.0.norm3.lora_A.weight"] = torch.zeros(4, 64)
    torch.save({"generator_lora": state, "step": 0}, tmp_path / "lora.pt")
    with pytest.raises(CheckpointError) as err:
        load_lora_checkpoint(add_lora(tiny_dit(GOLDEN_DIT), SETTINGS), tmp_path / "lora.pt")
    msg = str(err.value)
    assert "lora.pt (entry 'generator_lora')" in msg
    assert "1 missing key(s): blocks.1.ffn.2.lora_B.weight" in msg
    assert "1 unexpected key(s): blocks.0.norm3.lora_A.weight" in msg
    with pytest.raises(ValueError, match="no LoRA adapter"):
        load_lora_checkpoint(tiny_dit(GOLDEN_DIT), tmp_path / "lora.pt")


def test_a_base_checkpoint_given_as_a_lora_is_named_as_such(tmp_path):
    model = tiny_dit(GOLDEN_DIT)
    torch.save({"generator": {f"model.{k}": v for k, v in model.state_dict().items()}, "step": 3},
               tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match="is a base checkpoint .*give it as generator_ckpt"):
        load_lora_checkpoint(add_lora(model, SETTINGS), tmp_path / "base.pt")


def test_merged_equals_unmerged_and_saves_as_base(tmp_path):
    model = random_lora()
    unmerged = forward(model)
    assert (unmerged - forward(tiny_dit(GOLDEN_DIT))).abs().max() > 1e-2
    merged = merge_lora(model)
    assert type(merged) is WanDiT and not hasattr(merged, "peft_config")
    assert set(merged.state_dict()) == set(tiny_dit(GOLDEN_DIT).state_dict())
    out = forward(merged)
    assert (out - unmerged).abs().max().item() <= 1e-5
    save_generator_checkpoint(merged, tmp_path / "base.pt")
    plain = tiny_dit(GOLDEN_DIT, seed=5)
    load_generator_checkpoint(plain, tmp_path / "base.pt")
    assert torch.equal(forward(plain), out)


def test_reference_lora_file_loads():
    if not GOLDEN.is_dir():
        pytest.skip(f"reference golden files not found at {GOLDEN} (../shared/golden is absent)")
    model = WanDiT(GOLDEN_DIT).eval()
    load_generator_checkpoint(model, GOLDEN / "base.pt")
    model = add_lora(model, LoraSettings(rank=4, alpha=8))
    load_lora_checkpoint(model, GOLDEN / "lora.pt")
    ref = torch.load(GOLDEN / "lora.pt", map_location="cpu", weights_only=True)["generator_lora"]
    ours = lora_state_dict(model)
    assert set(ours) == set(ref) and len(ref) == 2 * 10 * 2
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    # The base weights under the adapter are still those of base.pt.
    base = torch.load(GOLDEN / "base.pt", map_location="cpu", weights_only=True)["generator"]
    params = model.state_dict()
    for key, value in base.items():
        name = key.removeprefix("model.")
        adapted = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(params[adapted if adapted in params else name], value)
