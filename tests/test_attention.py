"""The attention backend registry (names, availability, `supports`, selection, config names) and
the SDPA path against an explicit softmax."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config.inference import load_inference_config
from memflow import attention as attn
from memflow.errors import InputError
from trainer.config import TrainSettings, load_train_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_TRAIN = ROOT / "configs" / "tiny_train_init.yaml"


def test_sdpa_matches_explicit_softmax_with_and_without_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
    assert torch.allclose(attn.attention(q, k, v), ref, atol=1e-6)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    ref_masked = torch.einsum(
        "bhqk,bkhd->bqhd", logits.masked_fill(~mask, float("-inf")).softmax(-1), v
    )
    assert torch.allclose(attn.attention(q, k, v, mask), ref_masked, atol=1e-6)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry (and of the default `auto` kernel), restored after."""
    monkeypatch.setattr(attn, "BACKENDS", dict(attn.BACKENDS))
    monkeypatch.setattr(attn, "_auto", None)
    return attn.BACKENDS


def _installed(monkeypatch, *modules: str) -> None:
    """Pretend exactly `modules` can be imported."""
    monkeypatch.setattr(attn, "_importable", lambda module: module in modules)


def _fake(calls: list, module: str | None = None, priority: int = 100) -> attn.AttentionBackend:
    """A kernel that records its calls, takes only unmasked ones and returns SDPA's result."""
    def call(q, k, v, mask):
        calls.append(q.shape)
        return attn.SDPA.call(q, k, v, mask)

    return attn.AttentionBackend("fake", "fake kernel", call, lambda q, k, v, mask: mask is None,
                                 priority=priority, module=module, package="a test kernel")


def test_registry_names():
    assert tuple(attn.BACKENDS) == ("sdpa", "flash2", "flash3", "flash4")
    assert attn.backend_names() == ("auto", "sdpa", "flash2", "flash3", "flash4", "flash")
    assert all(name == b.name for name, b in attn.BACKENDS.items())


@pytest.mark.parametrize("name", ["auto", "sdpa"])
def test_cpu_calls_run_sdpa_even_with_flash_installed(registry, monkeypatch, name):
    _installed(monkeypatch, "flash_attn", "flash_attn_interface")
    kernel = attn.AttentionKernel(name)
    assert kernel.name == name
    q, k, v = _qkv(1, 4)
    assert kernel.backend_for(q, k, v) is attn.SDPA
    assert kernel.backend_for(q.half(), k.half(), v.half()) is attn.SDPA  # half, but on the CPU


def test_auto_without_flash_is_sdpa_only(registry, monkeypatch):
    _installed(monkeypatch)
    assert attn.AttentionKernel("auto").chain == (attn.SDPA,)


@pytest.mark.parametrize(
    "installed,expected",
    [(("flash_attn", "flash_attn_interface"), "flash3"), (("flash_attn",), "flash2"),
     (("flash_attn_interface",), "flash3")],
)
def test_flash_alias_and_auto_prefer_flash3(registry, monkeypatch, installed, expected):
    _installed(monkeypatch, *installed)
    assert [b.name for b in attn.AttentionKernel("flash").chain] == [expected, "sdpa"]
    chain = attn.AttentionKernel("auto").chain
    assert chain[0].name == expected and chain[-1] is attn.SDPA


def test_auto_takes_flash4_after_flash3_and_before_flash2(registry, monkeypatch):
    _installed(monkeypatch, "flash_attn", "flash_attn_interface", "flash_attn.cute")
    assert [b.name for b in attn.AttentionKernel("auto").chain] == [
        "flash3", "flash4", "flash2", "sdpa"]
    _installed(monkeypatch, "flash_attn.cute")
    assert [b.name for b in attn.AttentionKernel("auto").chain] == ["flash4", "sdpa"]


def test_flash4_takes_only_unmasked_half_precision_cuda_calls():
    flash4 = attn.BACKENDS["flash4"]
    q, k, v = _qkv(1, 4)
    assert not flash4.supports(q.half(), k.half(), v.half(), None)  # on the CPU


@pytest.mark.parametrize(
    "name,message",
    [
        ("flash3", "attention backend 'flash3' needs the flash_attn_interface package "
                   "(flash-attn 3, Hopper); install it or use attn_backend: sdpa"),
        ("flash2", "attention backend 'flash2' needs the flash_attn package "
                   "(flash-attn 2, Ampere or newer); install it or use attn_backend: sdpa"),
        ("flash4", "attention backend 'flash4' needs the flash_attn.cute package "
                   "(flash-attn-4, Hopper or Blackwell); install it or use attn_backend: sdpa"),
        ("flash", "attention backend 'flash' needs the flash_attn_interface package "
                  "(flash-attn 3, Hopper) or the flash_attn package (flash-attn 2, Ampere or "
                  "newer); install it or use attn_backend: sdpa"),
    ],
)
def test_explicit_unavailable_backend_names_the_package(registry, monkeypatch, name, message):
    _installed(monkeypatch)
    with pytest.raises(InputError) as err:
        attn.AttentionKernel(name)
    assert str(err.value) == message
    model = _tiny_model()
    with pytest.raises(InputError):
        model.set_attention_backend(name)
    assert model.attention_kernel.name == "auto"  # a failed selection keeps the previous one


def test_unknown_backend_lists_the_names(registry):
    with pytest.raises(InputError, match="unknown attention backend 'xformers'; use one of "
                                         "auto, sdpa, flash2, flash3, flash4, flash$"):
        attn.AttentionKernel("xformers")


def test_registered_backend_is_selected_called_and_its_supports_respected(registry):
    calls: list = []
    attn.register_backend(_fake(calls))
    assert "fake" in attn.backend_names()
    q, k, v = _qkv(2, 6)
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    for name in ("fake", "auto"):  # by name, and by auto from its priority
        kernel = attn.AttentionKernel(name)
        calls.clear()
        assert torch.equal(attn.attention(q, k, v, kernel=kernel), attn.SDPA.call(q, k, v, None))
        assert calls == [q.shape]
        # The fake does not take masks: the masked call runs SDPA, bit for bit.
        assert kernel.backend_for(q, k, v, mask) is attn.SDPA
        assert torch.equal(attn.attention(q, k, v, mask, kernel), attn.SDPA.call(q, k, v, mask))
        assert calls == [q.shape]


def test_registered_backend_below_sdpa_priority_is_not_picked_by_auto(registry):
    calls: list = []
    attn.register_backend(_fake(calls, priority=-1))
    attn.attention(*_qkv(1, 4), kernel=attn.AttentionKernel("auto"))
    attn.attention(*_qkv(1, 4))  # the default kernel is `auto` too
    assert calls == []


def test_registered_backend_missing_its_module_names_it(registry):
    attn.register_backend(_fake([], module="memflow_no_such_module"))
    with pytest.raises(InputError, match="^attention backend 'fake' needs the "
                                         "memflow_no_such_module package \\(a test kernel\\)"):
        attn.AttentionKernel("fake")
    assert attn.AttentionKernel("auto").chain == (attn.SDPA,)  # auto skips it


def _tiny_model():
    from conftest import tiny_dit

    return tiny_dit()


def test_each_model_calls_its_own_kernel(registry):
    """The kernel is a property of the model: a teacher and a generator may differ, and setting
    one leaves the other (and every later model) as it was."""
    from conftest import tiny_prompt

    calls: list = []
    attn.register_backend(_fake(calls, priority=-1))  # never picked by `auto`
    teacher, generator = _tiny_model(), _tiny_model()
    generator.set_attention_backend("fake")
    x = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t, ctx = torch.full((1,), 500.0), tiny_prompt()
    with torch.no_grad():
        teacher(x, t, ctx)
        assert calls == []
        out = generator(x, t, ctx)
    assert calls  # every attention call of the generator, none of the teacher
    assert teacher.attention_kernel.name == "auto" and _tiny_model().attention_kernel.name == "auto"
    with torch.no_grad():
        assert torch.equal(out, teacher(x, t, ctx))  # the fake returns SDPA's result


def test_schema_and_train_config_accept_each_registry_name_and_reject_others():
    for name in attn.backend_names():
        assert load_inference_config(TINY, [f"attn_backend={name}"]).attn_backend == name
        cfg = load_train_config(TINY_TRAIN, [f"attn_backend={name}"])
        assert TrainSettings.from_config(cfg, check_files=False).config.attn_backend == name
    allowed = ", ".join(attn.backend_names())
    with pytest.raises(InputError, match=f"`attn_backend` must be one of {allowed}; got 'flash9'"):
        load_inference_config(TINY, ["attn_backend=flash9"])
    with pytest.raises(InputError, match=f"`attn_backend` must be one of {allowed}; got 'flash9'"):
        TrainSettings.from_config(load_train_config(TINY_TRAIN, ["attn_backend=flash9"]),
                                  check_files=False)


def test_a_registered_backend_is_selectable_from_a_config(registry):
    """The config's allowed names are the registry's when the config is checked: registering a
    kernel is the one step that makes `attn_backend: <name>` valid."""
    with pytest.raises(InputError, match="`attn_backend` must be one of .*; got 'fake'"):
        load_inference_config(TINY, ["attn_backend=fake"])
    attn.register_backend(_fake([]))
    assert load_inference_config(TINY, ["attn_backend=fake"]).attn_backend == "fake"
    cfg = load_train_config(TINY_TRAIN, ["attn_backend=fake"])
    assert TrainSettings.from_config(cfg, check_files=False).config.attn_backend == "fake"


def test_config_comments_list_the_registry_names():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            if line.startswith("attn_backend:"):
                listed = [word.split()[0] for word in line.split("#", 1)[1].split("|")]
                assert tuple(listed) == attn.backend_names(), path.name




def _qkv(batch: int, length: int, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, length, 3, 8, generator=g).requires_grad_(grad) for _ in range(3)
    )
