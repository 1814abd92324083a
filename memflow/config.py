"""Configuration objects for the DiT and for streaming memory.

Everything that the reference hard-codes for 480x832 (tokens per frame, 3 frames per chunk,
12 heads of 128) is derived here from the model and geometry settings instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Mapping, Sequence


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Wan2.1 diffusion transformer. Defaults are Wan2.1-T2V-1.3B."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_frames: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.patch_size[0] != 1:
            raise ValueError("only a temporal patch size of 1 is supported (causal frames)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens of one latent frame after patchifying: (h / ph) * (w / pw)."""
        _, ph, pw = self.patch_size
        if latent_height % ph or latent_width % pw:
            raise ValueError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch "
                f"size {ph}x{pw}"
            )
        return (latent_height // ph) * (latent_width // pw)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DiTConfig":
        """Build from a dict, ignoring keys that are not fields (e.g. diffusers `_class_name`)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out


RecordPolicy = Literal["every_chunk", "every_interval"]
BankScore = Literal["mean_qk", "softmax_masked"]
KeepOrder = Literal["score_desc", "temporal"]


@dataclass(frozen=True)
class MemoryOptions:
    """How the memory bank (NAM) and sparse memory activation (SMA) behave.

    Each field names one place where the reference's behaviour and a corrected behaviour differ
    (spec §9). `MemoryOptions.compat(...)` gives the reference; `MemoryOptions.clean()` the
    defaults of this project.
    """

    # Which committed chunks stage a new prototype frame for the bank (spec Q1).
    # "every_chunk": every chunk (reference single-prompt script);
    # "every_interval": chunks n with n % record_interval == 0 (reference interactive script and
    # stage-2 training; its stage-1 rollout stages on every chunk, like "every_chunk").
    record_policy: RecordPolicy = "every_interval"
    # Re-insert/compress the same prototype on every chunk until a new one arrives (spec Q7).
    reinsert_stale_prototype: bool = False
    # Retrieval score (spec Q3): raw mean of q.k over all text positions, or softmax attention
    # mass with the text padding masked out.
    bank_score: BankScore = "mean_qk"
    # Compute retrieval scores in float32 even when the model runs in bf16 (spec Q4).
    score_in_fp32: bool = True
    # Order of the kept frames in the bank (spec Q5).
    keep_order: KeepOrder = "score_desc"
    # Build the cross-attention (text) cache before refreshing the bank, so retrieval after a
    # prompt switch uses the new prompt rather than all-zero keys (spec Q8).
    text_keys_before_refresh: bool = True
    # The committing re-run of a chunk whose denoising exited at step 0 refreshes the bank first,
    # like that step-0 call (TRAINING.md §10 item 5, the reference's q_bank leak: the re-run
    # inherits the last denoising call's q_bank flag). With `reinsert_stale_prototype` a full
    # bank is then compressed once more per such chunk (stage 2 from the first saturation on).
    commit_refreshes_after_step0_exit: bool = False
    # The bank is attended only when there is a sink (spec Q10: the reference's no-sink branch
    # ignores the bank, which is still maintained). Off: with sink_size 0 the keys are
    # [bank | window].
    bank_requires_sink: bool = False

    @classmethod
    def compat(
        cls,
        record_policy: RecordPolicy = "every_chunk",
        commit_refreshes_after_step0_exit: bool = True,
    ) -> "MemoryOptions":
        """The reference's behaviour, quirks included. The single-prompt script records every
        chunk (so does its stage-1 rollout); the interactive script and stage-2 training every
        `record_interval` chunks. The single-prompt script's re-run never inherits q_bank (it
        passes the default), so it turns the leak off; only a one-step schedule can tell."""
        return cls(
            record_policy=record_policy,
            reinsert_stale_prototype=True,
            bank_score="mean_qk",
            score_in_fp32=False,
            keep_order="score_desc",
            text_keys_before_refresh=False,
            commit_refreshes_after_step0_exit=commit_refreshes_after_step0_exit,
            bank_requires_sink=True,
        )

    @classmethod
    def clean(cls) -> "MemoryOptions":
        return cls()

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "MemoryOptions":
        if not overrides:
            return self
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown memory option(s) {unknown}; known: {sorted(names)}")
        return replace(self, **dict(overrides))


Positions = Literal["absolute", "relative"]


@dataclass(frozen=True)
class StreamConfig:
    """Streaming geometry and memory sizes, all in latent frames (never tokens).

    `local_attn_size` is the KV-cache capacity in frames including the sink (spec §2.2); -1 means
    a global cache as large as the video. The bank is not counted in it (spec K6).
    """

    num_frame_per_block: int = 3
    local_attn_size: int = 12
    sink_size: int = 3
    bank_size: int = 3
    record_interval: int = 3
    sma: bool = False
    sma_top_k: int = 3
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    # The attended memory: a layout registered by name in memflow/memory_sources.py
    # (`standard`: sink, bank, window).
    memory_layout: str = "standard"
    # Options of that layout (names it declares; e.g. the EMA memory's rates).
    memory_options: Mapping[str, Any] = field(default_factory=dict)
    # RoPE frame positions of a streaming call: `absolute` (the reference: each key keeps the
    # rotation of its frame in the video, so a stream ends at the RoPE table) or `relative` (keys
    # are kept un-rotated and placed, at every call, at their index in the attended context:
    # sink, memory, window, the call's own frames last; no end). memflow/streaming.py.
    positions: Positions = "absolute"
    # Fixed shapes for compiled and graph-captured inference (`compile: true`): the stream keeps
    # its context in one preallocated arena per layer (memflow/static_stream.py).
    static_shapes: bool = False

    def check_static(self) -> None:
        """ValueError unless a static stream can hold this one: the standard memory layout and a
        rolling window (`local_attn_size` != -1)."""
        if self.memory_layout != "standard":
            raise ValueError(f"fixed shapes (compile) need memory_layout: standard, "
                             f"not {self.memory_layout}")
        if self.local_attn_size == -1:
            raise ValueError("fixed shapes (compile) need a rolling window: set local_attn_size")

    def __post_init__(self) -> None:
        if self.num_frame_per_block < 1:
            raise ValueError("num_frame_per_block must be >= 1")
        if self.local_attn_size != -1 and self.local_attn_size < self.num_frame_per_block:
            raise ValueError(
                f"local_attn_size ({self.local_attn_size}) must hold at least one chunk "
                f"({self.num_frame_per_block} frames)"
            )
        if self.local_attn_size != -1 and self.sink_size >= self.local_attn_size:
            raise ValueError(
                f"sink_size ({self.sink_size}) must be smaller than local_attn_size "
                f"({self.local_attn_size})"
            )
        if min(self.sink_size, self.bank_size) < 0 or self.record_interval < 1:
            raise ValueError("sink_size/bank_size must be >= 0 and record_interval >= 1")
        if self.sma and self.sma_top_k < 1:
            raise ValueError("sma_top_k must be >= 1")
        if self.positions not in ("absolute", "relative"):
            raise ValueError(f"positions must be absolute or relative, got {self.positions!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """The few-step sampler: the distilled step list (warped onto the shifted schedule) and the
    timestep of the committing clean pass."""

    denoising_step_list: Sequence[int] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    context_noise: float = 0.0


@dataclass(frozen=True)
class SwitchOptions:
    """How a prompt switch treats the caches.

    global_sink: keep the sink's K/V across switches (released setting). Without it the
        reference zeroes the K/V buffers and, because the recache protects the sink, attends an
        all-zero sink afterwards (spec K2); that is reproduced in compat mode only.
    protect_sink_at_start: a switch within the first `local_attn_size` frames recaches from frame
        0; the reference then overwrites the sink with the new prompt (K3). True keeps the sink,
        as every later switch does.
    """

    global_sink: bool = True
    protect_sink_at_start: bool = True

    @classmethod
    def compat(cls, global_sink: bool = True) -> "SwitchOptions":
        return cls(global_sink=global_sink, protect_sink_at_start=False)

    def __post_init__(self) -> None:
        if not self.global_sink and self.protect_sink_at_start:
            raise ValueError(
                "global_sink=false is only available in compat mode: the reference leaves an "
                "all-zero sink after a switch (spec K2)"
            )
