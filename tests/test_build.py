"""Generator loading vs finalising: `load_generator` gives a trainable fp32 model (the library's
`memflow.checkpoint.load_wan_generator` is what training calls); `memflow.lora.apply_lora` +
`finalize_for_inference` on it is exactly what `build_components` returns."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference_files import save_generator_checkpoint
from test_real_format_loading import _overrides, wan_files  # noqa: F401 (wan_files is a fixture)

from config.inference import load_inference_config
from config.loader import DTYPES
from config.schema import InferenceConfig
from memflow.checkpoint import load_wan_config, load_wan_generator
from memflow.lora import apply_lora
from memflow.model import WanDiT
from memflow.tiny import build_tiny_dit
from pipeline.build import build_components, check_paths, finalize_for_inference, load_generator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CPU = torch.device("cpu")
ADAPTER = ["adapter={type: lora, rank: 4, alpha: 8}"]


def assert_same_parameters(a: WanDiT, b: WanDiT) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, p in pa.items():
        assert p.dtype == pb[name].dtype and p.device == pb[name].device, name
        assert torch.equal(p, pb[name]), name


def load_then_finalize(cfg: InferenceConfig) -> WanDiT:
    """The steps `build_components` is made of, called one by one."""
    paths = check_paths(cfg)
    generator = load_generator(cfg, paths)
    if cfg.adapter:
        generator = apply_lora(generator, cfg.adapter.lora_settings(), paths.lora_ckpt)
    return finalize_for_inference(
        generator, merge_lora=bool(cfg.lora_merge and cfg.adapter), device=CPU,
        dtype=DTYPES[cfg.dtype],
    )


def built_generator(cfg: InferenceConfig) -> WanDiT:
    return build_components(cfg, CPU, compat=False, paths=check_paths(cfg)).generator


def test_loaded_tiny_generator_is_trainable_built_one_is_frozen():
    cfg = load_inference_config(TINY)
    generator = load_generator(cfg, check_paths(cfg))
    params = list(generator.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 and p.device == CPU for p in params)
    c = generator.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c.in_dim, 2, 4, 4, generator=g)
    context = torch.randn(1, 8, c.text_dim, generator=g)
    generator(x, torch.tensor([[700.0, 300.0]]), context).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)

    built = built_generator(cfg)
    assert not any(p.requires_grad for p in built.parameters())
    assert not any(m.training for m in built.modules())


@pytest.mark.parametrize(
    "overrides",
    [[], ["dtype=bfloat16"], ADAPTER, ADAPTER + ["lora_merge=true"], ["lora_merge=true"]],
    ids=["plain", "bf16", "lora", "lora-merged", "merge-without-adapter"],
)
def test_tiny_load_then_finalize_equals_build_components(overrides):
    cfg = load_inference_config(TINY, overrides)
    torch.manual_seed(0)  # peft draws the LoRA A init from the global generator
    stepwise = load_then_finalize(cfg)
    torch.manual_seed(0)
    assert_same_parameters(stepwise, built_generator(cfg))
    if "lora_merge=true" in overrides:
        assert not hasattr(stepwise, "peft_config")


@pytest.mark.parametrize("variant", ["base", "lora", "ema"])
def test_real_format_load_equals_build_components(wan_files, tmp_path, variant):
    root, t5 = wan_files
    data = tmp_path / "p.txt"
    data.write_text("a cat\n")
    overrides = _overrides(root, tmp_path / "out", data, t5)
    if variant != "lora":
        overrides.append("adapter=null")
    if variant == "ema":
        folder = root / "wan_models" / "Wan2.1-T2V-1.3B"
        ema = save_generator_checkpoint(build_tiny_dit(load_wan_config(folder), seed=3),
                                        tmp_path / "ema.pt", key="generator_ema")
        overrides += [f"generator_ckpt={ema}", "use_ema=true"]
    cfg = load_inference_config(ROOT / "configs" / "inference.yaml", overrides)
    built = built_generator(cfg)
    assert_same_parameters(load_then_finalize(cfg), built)
    if variant != "lora":  # the cfg-free loader a trainer calls gives the same weights
        paths = check_paths(cfg)
        loaded = load_wan_generator(paths.wan_folder, paths.generator_ckpt, use_ema=cfg.use_ema)
        assert all(p.requires_grad for p in loaded.parameters())
        assert_same_parameters(loaded, built.requires_grad_(True))
