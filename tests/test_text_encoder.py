"""umT5 text encoder adapter: tokenizer handling, Wan checkpoint format, numerics vs the spec (§5.7)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference_files import to_wan_t5_state_dict

from memflow.text_encoder import (
    WAN_T5_CHECKPOINT,
    WAN_T5_TOKENIZER,
    TextEncoder,
    clean_prompt,
    load_tokenizer,
    new_umt5_encoder,
    umt5_encoder_config,
)
from memflow.tiny import build_tiny_text_encoder, build_tiny_tokenizer, tiny_t5_config

PROMPTS = ["A cat sitting on a red chair.", "Two people walking along the beach at sunrise, waves crashing."]
LONG_PROMPT = "hummingbird drinking nectar from a purple flower " * 60


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return build_tiny_text_encoder(tokenizer, seed=0)


def save_wan_checkpoint(encoder: TextEncoder, path) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in to_wan_t5_state_dict(encoder.encoder.state_dict()).items()}
    torch.save(state, path)
    return state


# --------------------------------------------------------------------------------------------
# A literal implementation of the spec's T5 (§5.7 "T5 block details"), on Wan-format weights
# --------------------------------------------------------------------------------------------
def spec_bucket(rel: int, num_buckets: int = 32, max_dist: int = 128) -> int:
    """Bidirectional: 16 buckets per direction (keys after the query in the upper half), exact
    below 8, log-spaced up to max_dist, clamped to the last bucket."""
    half = num_buckets // 2
    exact = half // 2
    base = half if rel > 0 else 0
    n = abs(rel)
    if n < exact:
        return base + n
    return base + min(half - 1, exact + int(math.log(n / exact) / math.log(max_dist / exact) * (half - exact)))


def spec_t5(wan: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    def rms(x, w):  # fp32 statistics, cast to the weight dtype, then times the weight
        return w * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(w.dtype)

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

    b, length = ids.shape
    x = wan["token_embedding.weight"][ids]
    dtype = x.dtype
    table = torch.tensor([spec_bucket(r) for r in range(-(length - 1), length)])
    buckets = table[torch.arange(length)[None, :] - torch.arange(length)[:, None] + length - 1]  # key - query
    num_layers = len({k.split(".")[1] for k in wan if k.startswith("blocks.")})
    for i in range(num_layers):
        w = {k[len(f"blocks.{i}.") :]: v for k, v in wan.items() if k.startswith(f"blocks.{i}.")}
        h = rms(x, w["norm1.weight"])
        q, k, v = (F.linear(h, w[f"attn.{n}.weight"]).view(b, length, num_heads, -1) for n in "qkv")
        bias = w["pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None].repeat(b, 1, 1, 1)
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(dtype).min)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias  # no 1/sqrt(d)
        probs = F.softmax(logits.float(), dim=-1).to(dtype)
        x = x + F.linear(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1), w["attn.o.weight"])
        h = rms(x, w["norm2.weight"])
        ffn = F.linear(h, w["ffn.fc1.weight"]) * gelu_tanh(F.linear(h, w["ffn.gate.0.weight"]))
        x = x + F.linear(ffn, w["ffn.fc2.weight"])
    x = rms(x, wan["norm.weight"])
    lengths = mask.sum(1)
    for row, n in zip(x, lengths):
        row[n:] = 0.0
    return x


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def test_tokenizer_pads_to_512_and_appends_eos(encoder, tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids, mask = encoder.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (2, 512)
    for row, row_mask in zip(ids, mask):
        n = int(row_mask.sum())
        assert 3 < n < 100
        assert row_mask[:n].all() and not row_mask[n:].any()
        assert row[n - 1] == 1, "</s> must close every prompt"
        assert (row[: n - 1] != 1).all() and (row[n:] == 0).all()


def test_overlong_prompt_is_truncated_with_a_warning(encoder):
    with pytest.warns(UserWarning, match="prompt 1 has .* tokens; truncated to text_len=512"):
        ids, mask = encoder.tokenize([PROMPTS[0], LONG_PROMPT])
    assert mask[1].all() and ids[1, -1] == 1, "truncation keeps </s> as the 512th token"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.tokenize(PROMPTS)


def test_prompt_cleanup():
    assert clean_prompt("  a &amp;amp; b\n\t  c  ") == "a & b c"
    assert clean_prompt("caf\u00c3\u00a9 \u00a0 au lait") == "café au lait"  # ftfy mojibake fix + NBSP run


def test_tokenizer_folder_loads_with_autotokenizer(tmp_path, tokenizer):
    build_tiny_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "spiece.model").is_file()
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]


# --------------------------------------------------------------------------------------------
# Wan checkpoint format
# --------------------------------------------------------------------------------------------
def test_wan_checkpoint_loads_and_matches(tmp_path, encoder, tokenizer):
    build_tiny_tokenizer(tmp_path / WAN_T5_TOKENIZER)
    wan = save_wan_checkpoint(encoder, tmp_path / WAN_T5_CHECKPOINT)
    assert "blocks.1.ffn.gate.0.weight" in wan and "token_embedding.weight" in wan
    loaded = TextEncoder.from_wan_folder(tmp_path, config=tiny_t5_config(len(tokenizer)), dtype=torch.float32)
    for key, value in encoder.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    delta = (loaded.encode(PROMPTS) - encoder.encode(PROMPTS)).abs().max().item()
    assert delta <= 1e-6, f"max |Δ| = {delta}"


def test_missing_file_names_the_file(tmp_path, tokenizer):
    path = tmp_path / "nowhere" / WAN_T5_CHECKPOINT
    with pytest.raises(FileNotFoundError, match="nowhere.*umT5 checkpoint not found"):
        TextEncoder.from_wan_checkpoint(path, tokenizer, config=tiny_t5_config(len(tokenizer)))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd.__setitem__("blocks.1.ffn.fc1.weight", torch.zeros(3, 32)), r"key 'blocks\.1\.ffn\.fc1\.weight' has shape \(3, 32\)"),
        (lambda sd: sd.pop("blocks.0.norm2.weight"), r"missing key 'blocks\.0\.norm2\.weight'"),
        (lambda sd: sd.__setitem__("blocks.0.attn.bias", torch.zeros(1)), r"unexpected key 'blocks\.0\.attn\.bias'"),
    ],
)
def test_bad_checkpoint_names_file_and_key(tmp_path, encoder, tokenizer, corrupt, message):
    path = tmp_path / WAN_T5_CHECKPOINT
    wan = to_wan_t5_state_dict(encoder.encoder.state_dict())
    corrupt(wan)
    torch.save(wan, path)
    with pytest.raises(ValueError, match=f"{WAN_T5_CHECKPOINT}: {message}"):
        TextEncoder.from_wan_checkpoint(path, tokenizer, config=tiny_t5_config(len(tokenizer)))


def test_umt5_xxl_config_has_wan_shapes():
    with torch.device("meta"):
        wan = to_wan_t5_state_dict(new_umt5_encoder(umt5_encoder_config()).state_dict())
    assert len(wan) == 2 + 24 * 10
    assert wan["token_embedding.weight"].shape == (256384, 4096)
    assert wan["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert wan["blocks.0.attn.q.weight"].shape == (4096, 4096)
    assert wan["blocks.0.ffn.gate.0.weight"].shape == wan["blocks.0.ffn.fc1.weight"].shape == (10240, 4096)
    assert wan["blocks.0.ffn.fc2.weight"].shape == (4096, 10240)


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------
def test_padding_rows_are_exactly_zero(encoder):
    out = encoder.encode(PROMPTS)
    _, mask = encoder.tokenize(PROMPTS)
    assert out.shape == (2, 512, 32) and out.dtype == torch.float32
    for row, n in zip(out, mask.sum(1)):
        assert (row[n:] == 0).all()
        assert (row[:n].abs().sum(-1) > 0).all()


def test_matches_literal_spec_t5_fp32(encoder):
    ids, mask = encoder.tokenize([PROMPTS[0], LONG_PROMPT[:300]])  # distances beyond 128 reach the last bucket
    wan = to_wan_t5_state_dict(encoder.encoder.state_dict())
    expected = spec_t5(wan, ids, mask, num_heads=4)
    delta = (encoder.encode([PROMPTS[0], LONG_PROMPT[:300]]) - expected).abs().max().item()
    assert delta <= 1e-5, f"adapter vs spec T5: max |Δ| = {delta}"


def test_matches_literal_spec_t5_bf16_bitwise(tokenizer):
    encoder = build_tiny_text_encoder(tokenizer, seed=1, dtype=torch.bfloat16)
    ids, mask = encoder.tokenize(PROMPTS)
    expected = spec_t5(to_wan_t5_state_dict(encoder.encoder.state_dict()), ids, mask, num_heads=4)
    out = encoder.encode(PROMPTS)
    assert out.dtype == torch.bfloat16
    delta = (out.float() - expected.float()).abs().max().item()
    assert torch.equal(out, expected), f"bf16 adapter vs spec T5: max |Δ| = {delta}"


def test_batch_of_two_equals_two_single_runs(encoder):
    both = encoder.encode(PROMPTS)
    singles = torch.cat([encoder.encode([p]) for p in PROMPTS])
    delta = (both - singles).abs().max().item()
    assert delta <= 1e-6, f"max |Δ| = {delta}"


def test_offload_keeps_weights_on_cpu(tokenizer, encoder):
    offloaded = build_tiny_text_encoder(tokenizer, seed=0, offload=True)
    assert torch.equal(offloaded.encode(PROMPTS), encoder.encode(PROMPTS))
    assert all(p.device.type == "cpu" for p in offloaded.parameters())
