"""The Wan2.1 text-to-video diffusion transformer, bidirectional and causal/streaming.

Parameter names are those of the original Wan2.1 checkpoints (`blocks.0.self_attn.q.weight`, ...)
so Wan `diffusion_pytorch_model.safetensors` and MemFlow `base.pt` load without renaming.

One module serves every use:
* `model(x, t, context)`: full bidirectional attention (the Wan teacher / critic);
* `model(x, t, context, stream=ctx)`: one streaming call; `ctx` (a `CallContext` opened by the
  stepper on a `StreamState`, or anything else with its `LayerAttention` shape) fixes what every
  layer attends to, and with relative positions also where each frame sits (the model then
  hands it un-rotated queries and keys). The model only reads it: cache commits, bank refreshes
  and the text cache are the stepper's business.

Text K/V: by default every layer projects the embedded prompt itself (so the text embedding and
`cross_attn.k/v/norm_k` get gradients); `text_kv=` passes cached per-layer K/V instead.

Training switches: `gradient_checkpointing` recomputes each `DiTBlock` in backward (every block
input, the streaming context included, is fixed at call time, so the recomputation equals the
forward); `DiTBlock` is the unit to wrap with FSDP2 `fully_shard` (`no_split_modules`).
"""
from __future__ import annotations

import math
from functools import partial
from types import FunctionType
from typing import Any, Callable, Hashable, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import AttentionKernel, attention
from .config import DiTConfig
from .rope import RopePrecision, RotaryEmbedding, apply_rope

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


FramePhases = Callable[[int, int], torch.Tensor]  # (first frame index, frames) -> RoPE phases


class LayerAttention(Protocol):
    """What a DiT call's self-attention reads, layer by layer: a streaming `CallContext`
    (memflow/streaming.py), or in tests a dense mask over the call's own tokens.

    `places_frames` False: the model rotates the call's queries and keys by their frames'
    indices from `start_frame` (absolute positions). True: the model hands them over un-rotated
    with `phases` (this call's RoPE for any frame indices), and the attention places every key and
    query itself (relative positions). `graph_variant`: calls with the same token shape and
    variant trace the same compiled graph (a static stream's masked and dense calls differ)."""

    @property
    def start_frame(self) -> int: ...

    @property
    def places_frames(self) -> bool: ...

    @property
    def graph_variant(self) -> Hashable: ...

    def layer(self, index: int, kernel: AttentionKernel,
              phases: FramePhases | None = None) -> AttendFn: ...


TextKV = tuple[torch.Tensor, torch.Tensor]


def sinusoidal_embedding(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[cos, sin] timestep features computed in float64 (spec §1.3)."""
    half = dim // 2
    pos = positions.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angles = torch.outer(pos, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Norms compute in float32 for half-precision inputs (as Wan does) and in float64 for a
    float64 model (gradient checks), never below the input's precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight (Wan's order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_fp32(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the parameter dtype, cast back to the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _at_least_fp32(x)
        weight = self.weight.to(xf.dtype) if self.weight is not None else None
        bias = self.bias.to(xf.dtype) if self.bias is not None else None
        return F.layer_norm(xf, self.normalized_shape, weight, bias, self.eps).type_as(x)


class _Projections(nn.Module):
    """q/k/v/o linears with q/k RMS norms; Wan normalises q and k over all heads together,
    before the head split."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(_Projections):
    def forward(self, x: torch.Tensor, phases: torch.Tensor | None, attend: AttendFn) -> torch.Tensor:
        """`phases`: the RoPE of the call's tokens, or None when `attend` places them itself."""
        b, length, _ = x.shape
        heads = (b, length, self.num_heads, -1)
        q = self.norm_q(self.q(x)).view(heads)
        k = self.norm_k(self.k(x)).view(heads)
        if phases is not None:
            q, k = apply_rope(q, phases), apply_rope(k, phases)
        v = self.v(x).view(heads)
        return self.o(attend(q, k, v).flatten(2))


class CrossAttention(_Projections):
    """Video tokens attend to the embedded prompt (all text positions, no mask, no RoPE)."""

    def project_text(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text keys and values [B, T, H, D]; they are cached per prompt while streaming and the
        keys also serve as the memory bank's retrieval queries."""
        b, t, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, t, self.num_heads, -1)
        v = self.v(context).view(b, t, self.num_heads, -1)
        return k, v

    def forward(self, x: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor,
                attend: AttendFn) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, length, self.num_heads, -1)
        return self.o(attend(q, text_k, text_v).flatten(2))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def text_kv(self, text_emb: torch.Tensor) -> TextKV:
        """This layer's cross-attention K/V of an embedded prompt (a method of the block, so a
        sharded block gathers its weights for it: see memflow/fsdp.py)."""
        return self.cross_attn.project_text(text_emb)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        phases: torch.Tensor | None,
        attend: AttendFn,
        text: TextKV | torch.Tensor,
        cross_attend: AttendFn = attention,
    ) -> torch.Tensor:
        """x: [B, F*Lf, dim]; e0: [B, F, 6, dim] per-frame modulation from the timestep; `text`:
        this layer's cached text K/V, or the embedded prompt [B, T, dim] to project here;
        `attend` / `cross_attend`: the self- and cross-attention of this call."""
        frames = e0.shape[1]
        # not self.text_kv: under FSDP2 that registered method would reshard after returning
        text_kv = self.cross_attn.project_text(text) if torch.is_tensor(text) else text
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(1) + e0).chunk(
            6, dim=2
        )

        def per_frame(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(1, (frames, -1))

        h = (per_frame(self.norm1(x)) * (1 + scale1) + shift1).flatten(1, 2)
        y = self.self_attn(h, phases, attend)
        x = x + (per_frame(y) * gate1).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x), *text_kv, cross_attend)
        h = (per_frame(self.norm2(x)) * (1 + scale2) + shift2).flatten(1, 2)
        return x + (per_frame(self.ffn(h)) * gate2).flatten(1, 2)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, F*Lf, dim]; e: [B, F, 1, dim], the time embedding (not the projection)."""
        shift, scale = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(1, (e.shape[1], -1)) * (1 + scale) + shift)


class WanDiT(nn.Module):
    """Wan2.1 DiT. Input latents [B, C, F, h, w], timesteps [B, F] (or [B]), prompt embeddings
    [B, T<=text_len, text_dim]; output the flow prediction [B, out_dim, F, h, w]."""

    no_split_modules = (DiTBlock,)  # the FSDP2 / activation-checkpointing unit

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        cfg = config or DiTConfig()
        self.config = cfg
        self.gradient_checkpointing = False
        self.patch_embedding = nn.Conv3d(
            cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = RotaryEmbedding(cfg.head_dim, max_frames=cfg.rope_max_frames)
        self.attention_kernel = AttentionKernel("auto")
        self._compile_options: dict[str, Any] | None = None  # see compile_blocks
        self._compiled_blocks: dict[tuple, Callable] = {}

    def set_attention_backend(self, name: str) -> None:
        """The attention kernel of this model's calls, by a name of `attention.backend_names()`
        (InputError for an unknown or uninstalled one); other models keep theirs."""
        self.attention_kernel = AttentionKernel(name)

    def compile_blocks(self, **options: Any) -> None:
        """Run every block through `torch.compile` (`options`: its keyword arguments, e.g.
        `mode`, `fullgraph`; `disable=True`: eager again). Each token shape and graph variant of
        a call (`LayerAttention.graph_variant`) gets its own compiled entry, shared by all blocks
        (their parameters are graph inputs), so a static stream's calls (a chunk, a recache;
        masked or dense) compile once each and nothing is ever recompiled. Parameter
        names do not change (checkpoints and FSDP are unaffected). A streaming attention that
        is not traceable (the dynamic `StreamState`'s, which slices by host numbers) runs eagerly
        between compiled pieces; the static arena's is traced with the block."""
        self._compile_options = None if options.get("disable") else options
        self._compiled_blocks = {}

    @property
    def compiled(self) -> bool:
        """Whether `compile_blocks` asked for compiled blocks."""
        return self._compile_options is not None

    def _block_runner(self, tokens: torch.Tensor, variant: Hashable = None) -> Callable:
        """The (compiled, when `compile_blocks` asked for it) function that runs a block on
        these tokens, for a call of this graph variant."""
        if self._compile_options is None:
            return _run_block
        key = (tuple(tokens.shape), tokens.dtype, torch.is_grad_enabled(), variant)
        if key not in self._compiled_blocks:
            # a code object of its own per shape: dynamo caches compiled code per code object,
            # so a new shape is a first compilation, never a recompilation of another's
            code = _run_block.__code__.replace(co_name=f"run_block_{len(self._compiled_blocks)}")
            runner = FunctionType(code, _run_block.__globals__, code.co_name)
            self._compiled_blocks[key] = torch.compile(runner, **self._compile_options)
        return self._compiled_blocks[key]

    def set_rope_precision(self, precision: RopePrecision) -> None:
        """How this model applies RoPE (memflow/rope.py): "float64", the reference's and the
        default, or "float32" (`behaviour: clean`)."""
        cfg = self.config
        self.rope = RotaryEmbedding(cfg.head_dim, max_frames=cfg.rope_max_frames,
                                    precision=precision)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Zero-pad the prompt embeddings to text_len rows and embed them [B, text_len, dim]."""
        cfg = self.config
        b, t, c = context.shape
        if c != cfg.text_dim or t > cfg.text_len:
            raise ValueError(
                f"prompt embeddings {tuple(context.shape)} do not fit text_dim {cfg.text_dim} "
                f"and text_len {cfg.text_len}"
            )
        context = context.to(self.dtype)
        if t < cfg.text_len:
            context = torch.cat([context, context.new_zeros(b, cfg.text_len - t, c)], dim=1)
        return self.text_embedding(context)

    def text_kv(self, context: torch.Tensor) -> list[TextKV]:
        """Every layer's cross-attention K/V for a prompt (what a streaming text cache holds)."""
        emb = self.embed_text(context)
        return [block.text_kv(emb) for block in self.blocks]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        text_kv: Sequence[TextKV] | None = None,
        stream: LayerAttention | None = None,
        start_frame: int = 0,
    ) -> torch.Tensor:
        """One DiT call: its self-attention is what `stream` gives each layer (a streaming call's
        context), else bidirectional over the call's tokens at positions from `start_frame`."""
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"expected latents [B, {cfg.in_dim}, F, h, w], got {tuple(x.shape)}")
        if (context is None) == (text_kv is None):
            raise ValueError("give exactly one of context (prompt embeddings) and text_kv")
        b, _, frames, height, width = x.shape
        tokens = self.patch_embedding(x.to(self.dtype))
        grid = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        if t.dim() == 1:
            t = t[:, None].expand(b, frames)
        if t.shape != (b, frames):
            raise ValueError(f"timesteps must be [B, F] = [{b}, {frames}], got {tuple(t.shape)}")

        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t.flatten()).type_as(tokens))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (b, frames))
        frames_placed = stream is not None and stream.places_frames
        if stream is not None:
            start_frame = stream.start_frame
        phases = None if frames_placed else self.rope.phases(start_frame, *grid, device=tokens.device)
        frame_phases = partial(self.rope.phases, height=grid[1], width=grid[2], device=tokens.device)
        text_emb = self.embed_text(context) if context is not None else None

        kernel = self.attention_kernel
        bidirectional = partial(attention, kernel=kernel)
        # every block sees tokens of this shape
        run = self._block_runner(tokens, None if stream is None else stream.graph_variant)
        for i, block in enumerate(self.blocks):
            attend: AttendFn = (bidirectional if stream is None else
                                stream.layer(i, kernel, frame_phases if frames_placed else None))
            text = text_kv[i] if text_kv is not None else text_emb
            args = (block, tokens, e0, phases, attend, text, bidirectional)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(run, *args, use_reentrant=False)
            else:
                tokens = run(*args)

        out = self.head(tokens, e.unflatten(0, (b, frames)).unsqueeze(2))
        return self.unpatchify(out, grid)

    def unpatchify(self, out: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        """[B, F, gh*gw, pt*ph*pw*C] (channels fastest) -> [B, C, F*pt, gh*ph, gw*pw]."""
        b = out.shape[0]
        f, gh, gw = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        out = out.reshape(b, f, gh, gw, pt, ph, pw, c)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, c, f * pt, gh * ph, gw * pw)


def _run_block(block: DiTBlock, *args: Any) -> torch.Tensor:
    return block(*args)


def text_mask(context: torch.Tensor, text_len: int) -> torch.Tensor:
    """True on real prompt rows: the text encoder zeroes padding rows exactly."""
    real = context.abs().sum(dim=-1) > 0
    if real.shape[1] < text_len:
        pad = real.new_zeros(real.shape[0], text_len - real.shape[1])
        real = torch.cat([real, pad], dim=1)
    return real
