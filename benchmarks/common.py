"""Shared pieces of the hand-run benchmarks: presets, memory modes, timers, memory probes, the
analytic FLOP count, machine description and markdown output.

Benchmarks are not tests. Each script prints a markdown report (command, machine, date, load)
and can append it to docs/benchmarks.md with `--append docs/benchmarks.md`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from memflow.config import DiTConfig, MemoryOptions, StreamConfig  # noqa: E402

# --------------------------------------------------------------------------------------------
# Presets and memory modes
# --------------------------------------------------------------------------------------------

H100_TFLOPS = 800.0  # the "realistic dense bf16" figure for one H100


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    latent_hw: tuple[int, int]
    prompt_tokens: int  # real (non-padding) prompt rows; the rest of text_len is zero padding
    frames: int  # default latent frames of a bench_generation run
    e2e_frames: int  # default latent frames of its decode + MP4 videos
    note: str


_REAL_FRAME_LEN = DiTConfig().tokens_per_frame(60, 104)  # tokens per frame at 832x480

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        DiTConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64, text_len=64),
        latent_hw=(16, 24),
        prompt_tokens=20,
        frames=60,
        e2e_frames=36,  # the tiny VAE decodes ~3 s per chunk on one CPU core
        note="CPU-sized: dim 128, 2 heads of 64, 4 layers, ffn 512, 16x24 latents "
        "(96 tokens/frame, 128x192 pixels), 64 text tokens",
    ),
    "small": Preset(
        "small",
        DiTConfig(dim=64, ffn_dim=256, num_heads=1, num_layers=1, text_dim=64, text_len=512),
        latent_hw=(60, 104),
        prompt_tokens=100,
        frames=60,
        e2e_frames=30,
        note=f"real 832x480 geometry (60x104 latents, {_REAL_FRAME_LEN} tokens/frame, "
        f"{3 * _REAL_FRAME_LEN} per block, 512 text tokens) with a narrow model: dim 64, 1 head "
        "of 64, 1 layer, ffn 256",
    ),
    "wan1.3b": Preset(
        "wan1.3b",
        DiTConfig(),  # Wan2.1-T2V-1.3B: dim 1536, ffn 8960, 12 heads, 30 layers
        latent_hw=(60, 104),
        prompt_tokens=100,
        frames=60,
        e2e_frames=60,
        note="Wan2.1-T2V-1.3B shapes with random weights (dim 1536, ffn 8960, 12x128 heads, "
        "30 layers, text 512x4096), 832x480",
    ),
}


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    sink: int
    bank: int
    sma: bool
    local_attn: int | None = None  # None: the --local-attn-size of the run


MODES: dict[str, Mode] = {
    "none": Mode("none", "no memory (window only)", 0, 0, False),
    "sink": Mode("sink", "frame sink only", 3, 0, False),
    "nam": Mode("nam", "NAM (sink + bank)", 3, 3, False),
    "nam_sma": Mode("nam_sma", "NAM + SMA", 3, 3, True),
    # Not in the default set: a window of 9 frames with no sink, i.e. the sink-only baseline
    # with its sink slots dropped. Its attention span matches what the paper's "no memory"
    # speed suggests (see docs/benchmarks.md).
    "none9": Mode("none9", "no memory, 9-frame window", 0, 0, False, local_attn=9),
}
DEFAULT_MODES = ("none", "sink", "nam", "nam_sma")
BASELINE_MODE = "sink"


def stream_config(mode: Mode, args: Any) -> StreamConfig:
    memory = MemoryOptions.compat() if args.behaviour == "compat" else MemoryOptions.clean()
    return StreamConfig(
        num_frame_per_block=args.frames_per_block,
        local_attn_size=mode.local_attn or args.local_attn_size,
        sink_size=mode.sink,
        bank_size=mode.bank,
        record_interval=args.record_interval,
        sma=mode.sma,
        sma_top_k=args.sma_top_k,
        memory=memory,
    )


def parse_modes(text: str) -> list[Mode]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    return [MODES[k] for k in keys]


def add_common_args(parser, default_modes: str = ",".join(DEFAULT_MODES)) -> None:
    g = parser.add_argument_group("model and geometry")
    g.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    g.add_argument("--layers", type=int, default=None,
                   help="run only N DiT layers and extrapolate per layer to the preset's depth "
                   "(for --preset wan1.3b on CPU); reported as extrapolated")
    g.add_argument("--frames", type=int, default=None, help="latent frames per video")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: bf16 on CUDA, fp32 on CPU (CPU bf16 matmul is very slow "
                   "without AMX)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=0)
    s = parser.add_argument_group("streaming")
    s.add_argument("--modes", default=default_modes,
                   help=f"comma list of {', '.join(MODES)} (default {default_modes})")
    s.add_argument("--behaviour", choices=("clean", "compat"), default="clean",
                   help="memory options: clean (project default: record every 3rd chunk) or "
                   "compat (reference: record and re-score every chunk)")
    s.add_argument("--frames-per-block", type=int, default=3)
    s.add_argument("--local-attn-size", type=int, default=12)
    s.add_argument("--record-interval", type=int, default=3)
    s.add_argument("--sma-top-k", type=int, default=3)
    s.add_argument("--steps", default="1000,750,500,250", help="denoising step list")
    o = parser.add_argument_group("output")
    o.add_argument("--append", default=None, metavar="MD",
                   help="append the markdown report to this file (e.g. docs/benchmarks.md)")
    o.add_argument("--json", default=None, metavar="PATH", help="write raw records as JSON")


def resolve(args: Any) -> tuple[Preset, torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.layers is not None:
        if not 1 <= args.layers <= preset.dit.num_layers:
            raise SystemExit(f"--layers must be in [1, {preset.dit.num_layers}]")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    if args.frames is None:
        args.frames = preset.frames
    if args.frames % args.frames_per_block:
        raise SystemExit("--frames must be a multiple of --frames-per-block")
    return preset, device, dtype


def run_config(preset: Preset, args: Any) -> DiTConfig:
    """The DiT shape actually run: the preset, with fewer layers under --layers."""
    if args.layers is None:
        return preset.dit
    return replace(preset.dit, num_layers=args.layers)


def build_model(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight WanDiT built the way a checkpoint would be loaded (on the CPU, then
    moved and cast). Speed does not depend on the weight values."""
    from memflow.model import WanDiT

    torch.manual_seed(seed)
    return WanDiT(cfg).eval().to(device=device, dtype=dtype)


def prompt_embeds(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int = 1):
    cfg = preset.dit
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) * 0.1
    ctx[:, preset.prompt_tokens:] = 0  # the T5 output is exactly zero on padding rows
    return ctx.to(device, dtype)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Wall clock after everything queued on the device has finished."""
    sync(device)
    return time.perf_counter()


class RegionTimer:
    """Accumulates time per named region without synchronising on CUDA.

    On CUDA each region records a pair of events; `collect()` (once per block, after a sync)
    turns them into milliseconds. Event time is the GPU time between the two points of the
    stream, which is what a kernel region costs when the GPU is kept busy. On CPU it is wall
    time from `perf_counter`.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._pending: list[tuple[str, Any, Any]] = []
        self._open: dict[int, list[tuple[str, Any]]] = {}

    def start(self, name: str, key: int | None = None):
        mark = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            mark.record()
        self._open.setdefault(key if key is not None else hash(name), []).append((name, mark))

    def stop(self, name: str, key: int | None = None) -> None:
        stack = self._open[key if key is not None else hash(name)]
        opened, mark = stack.pop()
        assert opened == name, (opened, name)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((name, mark, end))
        else:
            self._add(name, time.perf_counter() - mark)

    @contextlib.contextmanager
    def region(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def _add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def collect(self) -> dict[str, float]:
        """Seconds per region since the last collect (syncs on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, a, b in self._pending:
                self._add(name, a.elapsed_time(b) / 1000.0)
            self._pending.clear()
        out = dict(self.totals)
        self.totals.clear()
        self.counts.clear()
        return out


def time_layers(model, timer: RegionTimer) -> Callable[[], None]:
    """Time the per-layer work under the region "layers"; returns an undo function.

    That is every DiT block's forward plus the streaming work done per layer outside it: the
    layer's context read (`CallContext.layer`: cache views, bank slots) before the block, and the
    commit of its K/V and prototype (`KVCache.commit_layer`, `MemoryBank.stage_layer`) after the
    call. Whatever is left of a DiT call scales with the call, not with the number of layers.
    """
    import memflow.kv_cache as kvm
    import memflow.memory_bank as mbm
    import memflow.streaming as sm

    handles = []
    for block in model.blocks:
        handles.append(block.register_forward_pre_hook(
            lambda *_: timer.start("layers", key=-1)))
        handles.append(block.register_forward_hook(lambda *_: timer.stop("layers", key=-1)))
    restore = []
    for owner, name in ((sm.CallContext, "layer"), (kvm.KVCache, "commit_layer"),
                        (mbm.MemoryBank, "stage_layer")):
        original = getattr(owner, name)

        def timed(*a, _original=original, **k):
            timer.start("layers", key=-1)
            try:
                return _original(*a, **k)
            finally:
                timer.stop("layers", key=-1)

        setattr(owner, name, timed)
        restore.append((owner, name, original))

    def undo() -> None:
        for h in handles:
            h.remove()
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)

    return undo


def summary(values: Sequence[float]) -> dict[str, float]:
    vals = list(values)
    if not vals:
        return {"n": 0, "min": float("nan"), "median": float("nan"), "mean": float("nan"),
                "max": float("nan")}
    return {"n": len(vals), "min": min(vals), "median": statistics.median(vals),
            "mean": statistics.fmean(vals), "max": max(vals)}


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return 0


def peak_rss_bytes() -> int:
    """Peak RSS of this process since it started (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryProbe:
    """Current and peak memory: CUDA allocator figures on CUDA, process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    @property
    def kind(self) -> str:
        return "CUDA allocated" if self.cuda else "process RSS"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else rss_bytes()

    def peak(self) -> int:
        """Peak since the last reset_peak on CUDA; since process start on CPU (RSS high water)."""
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else peak_rss_bytes()

    def reserved_peak(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.cuda else None


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:,.2f}"


# --------------------------------------------------------------------------------------------
# Analytic FLOP count (multiply-add = 2 FLOPs; softmax, norms, RoPE and elementwise excluded)
# --------------------------------------------------------------------------------------------

def call_flops(cfg: DiTConfig, query_tokens: int, key_tokens: int, frames: int) -> dict[str, float]:
    """FLOPs of one streaming DiT call over `query_tokens` new tokens (`frames` latent frames)
    whose self-attention sees `key_tokens` keys (sink + bank + window, current chunk included).

    Per layer, with Lq query tokens, Lk keys, T text tokens, d = dim, f = ffn_dim:
      self-attention q, k, v, o projections   8 Lq d^2
      self-attention scores and values        4 Lq Lk d     (QK^T and PV over all heads)
      cross-attention q, o projections        4 Lq d^2      (text K/V are cached per prompt)
      cross-attention over T text tokens      4 Lq T d
      FFN                                     4 Lq d f
    plus, once per call, the patch embedding, the output head and the time embedding.
    """
    d, f, T, L = cfg.dim, cfg.ffn_dim, cfg.text_len, cfg.num_layers
    lq, lk = query_tokens, key_tokens
    patch = math.prod(cfg.patch_size)
    out = {
        "self_proj": L * 8 * lq * d * d,
        "self_attn": L * 4 * lq * lk * d,
        "cross_proj": L * 4 * lq * d * d,
        "cross_attn": L * 4 * lq * T * d,
        "ffn": L * 4 * lq * d * f,
        "embed_head": 2 * lq * patch * (cfg.in_dim + cfg.out_dim) * d
        + 2 * frames * (cfg.freq_dim * d + d * d + d * 6 * d),
    }
    return out


def linear_flops(parts: dict[str, float]) -> float:
    return parts["self_proj"] + parts["cross_proj"] + parts["ffn"] + parts["embed_head"]


def attention_flops(parts: dict[str, float]) -> float:
    return parts["self_attn"] + parts["cross_attn"]


def prompt_flops(cfg: DiTConfig) -> float:
    """Once per prompt: text embedding MLP and every layer's cross-attention K/V projections."""
    d, T = cfg.dim, cfg.text_len
    return 2 * T * (cfg.text_dim * d + d * d) + cfg.num_layers * 4 * T * d * d


def nam_refresh_flops(cfg: DiTConfig, slots: int, frame_len: int) -> float:
    """One bank compression: prompt keys (T) against every stored frame token, all layers."""
    return cfg.num_layers * 2 * cfg.text_len * slots * frame_len * cfg.dim


def block_flops(cfg: DiTConfig, frame_len: int, fpb: int, steps: int, key_frames_denoise: int,
                key_frames_commit: int) -> float:
    lq = fpb * frame_len
    den = sum(call_flops(cfg, lq, key_frames_denoise * frame_len, fpb).values())
    com = sum(call_flops(cfg, lq, key_frames_commit * frame_len, fpb).values())
    return steps * den + com


# --------------------------------------------------------------------------------------------
# Machine description and markdown
# --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load": "%.2f %.2f %.2f" % os.getloadavg(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        info["cuda"] = torch.version.cuda
        info["attention"] = attention_kernel_name(device)
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "memflow", "pipeline"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        info["commit"] = rev + (" (+ uncommitted changes in memflow/pipeline)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def attention_kernel_name(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                          backend: str = "auto") -> str:
    """The kernel an unmasked attention call of the Wan 1.3B DiT on `device` runs under
    `backend` (`memflow.attention` registry), e.g. "flash-attn 3" or "torch SDPA"."""
    from memflow.attention import AttentionKernel

    q = torch.empty(1, 1, 1, DiTConfig().head_dim, device=device, dtype=dtype)
    return AttentionKernel(backend).backend_for(q, q, q).title


def command_line() -> str:
    argv = [Path(sys.argv[0]).as_posix()]
    try:
        argv[0] = Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv + sys.argv[1:])


def machine_md(info: dict[str, Any], started_load: str | None = None) -> str:
    lines = [
        f"- command: `{command_line()}`",
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}, {info['cores']} cores visible, torch threads "
        f"{info['torch_threads']}; torch {info['torch']}, Python {info['python']}",
        f"- device: {info['device']}" + (f" ({info['gpu']}, CUDA {info['cuda']}, attention "
                                         f"{info['attention']})" if "gpu" in info else ""),
        f"- load average (1/5/15 min): {started_load + ' at start, ' if started_load else ''}"
        f"{info['load']} at end",
    ]
    if "commit" in info:
        lines.append(f"- code: {info['commit']}")
    return "\n".join(lines)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def emit(report: str, args: Any, records: Any = None) -> None:
    print(report)
    if args.append:
        path = Path(args.append)
        with path.open("a") as f:
            f.write("\n" + report.rstrip() + "\n")
        print(f"\n(appended to {path})", file=sys.stderr)
    if args.json and records is not None:
        Path(args.json).write_text(json.dumps(records, indent=1, default=str))
        print(f"(raw records in {args.json})", file=sys.stderr)


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    return f"{seconds * 1000:,.1f}"


def fmt_s(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    return f"{seconds:,.3f}" if seconds < 10 else f"{seconds:,.1f}"
