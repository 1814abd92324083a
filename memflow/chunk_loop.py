"""The chunk loop: streaming generation one chunk at a time, shared by every caller.

Single-prompt and interactive inference, the live session, the benchmarks, stage-1 rollouts and
stage-2 windows all run the same per-chunk procedure (spec INFERENCE.md §5.3, TRAINING.md §3.2)
on a `StreamState`, through `ChunkStepper.step`:

  1. `denoise`: from the chunk's noise, for each timestep of the (warped) step list, predict the
     flow, convert to x0 and, except after the last step, re-noise x0 to the next timestep with
     fresh noise. The first step refreshes the memory bank. With an `exit_step` k the loop stops
     after step k (a training rollout); with `grad` only that last call carries gradients.
  2. `commit`: one more call on the clean x0 (re-noised to `context_noise` when the noise source
     draws context noise, as training does) writes the chunk's K/V into the cache and stages the
     bank prototype. It never carries gradients. After a denoise that exited at step 0 it first
     refreshes the bank like that step did, when `commit_refreshes_after_step0_exit` is on
     (compat: the reference's re-run inherits the last step's q_bank flag).

A video under generation is a `memflow.stream.Stream` (its state, noise, prompt, pending switch
and recent latents); `Stream.next_chunk` runs `step` once. `rollout` is a loop over a stream's
chunks: from chunk 0 of a fresh state (a video, a stage-1 rollout) or from any chunk of a state
that holds the earlier ones (a stage-2 window). Each chunk gets its own exit step and gradient
flag (a value or a rule of the chunk index), and a `before_chunk(n, stream)` hook runs before
it: prompt switches are asked for there (`stream.set_prompt`), and the stream applies them with
`switch_prompt`, the recache of interactive inference and stage-2 training.

The stepper owns the stream policy around each DiT call (bank refresh before it, text cache,
commit after it); the model only computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .config import SamplingConfig, StreamConfig, SwitchOptions
from .model import WanDiT, text_mask
from .noise import NoiseSource
from .prompt_blend import Transition
from .scheduler import FlowMatchScheduler, noised, x0_from_flow
from .static_stream import AnyStreamState, StaticStreamState
from .stream import ControlChange, Stream
from .stream_call import StreamCall
from .streaming import StreamState

ChunkCallback = Callable[[int, torch.Tensor], None]
BeforeChunk = Callable[[int, Stream], None]
ExitStep = int | Callable[[int], int | None] | None
GradRule = bool | Callable[[int], bool]


@dataclass
class ChunkHooks:
    """Optional callbacks around each chunk of a stream (`Stream.next_chunk`).

    `before_chunk(n, stream)` runs before chunk n (before any pending prompt is applied and the
    chunk's noise drawn): it may ask for a prompt from chunk n on (`stream.set_prompt`).
    `on_chunk(n, x0)`: chunk n's x0 is final, before its commit (streaming decode).
    `after_commit(n)`: chunk n is in the cache (timing)."""

    before_chunk: BeforeChunk | None = None
    on_chunk: ChunkCallback | None = None
    after_commit: Callable[[int], None] | None = None


class ChunkStepper:
    """Runs chunks of a streaming video through the causal DiT, a KV cache and a memory bank."""

    def __init__(
        self,
        generator: WanDiT,
        stream_config: StreamConfig,
        sampling: SamplingConfig,
        dtype: torch.dtype | None = None,
    ):
        """`dtype`: the dtype the DiT computes in, for the caches and the noise; defaults to the
        generator's parameter dtype (it differs under FSDP mixed precision: fp32 master
        weights, bf16 compute)."""
        self.generator = generator
        # run around every chunk of every stream of this stepper, before a call's own hooks:
        # the one place for a per-chunk behaviour of all its callers (offline and live alike)
        self.hooks: list[ChunkHooks] = []
        self.dtype = dtype or generator.dtype
        self.stream_config = stream_config
        self.sampling = sampling
        self.scheduler = FlowMatchScheduler(shift=sampling.timestep_shift)
        self.timesteps = self.scheduler.denoising_timesteps(
            sampling.denoising_step_list, warp=sampling.warp_denoising_step
        )
        # the hot loop reads timesteps as host numbers and sigmas as device tensors, so a
        # denoising step never waits for the device to hand a value back
        self.step_times = tuple(float(t) for t in self.timesteps)
        self._step_sigmas = self.scheduler.step_sigmas(self.timesteps)
        self._sigmas_on: dict[torch.device, list[torch.Tensor]] = {}

    def step_sigmas(self, device: torch.device) -> list[torch.Tensor]:
        """Each denoising step's sigma ([1], float32) on `device`, moved there once."""
        if device not in self._sigmas_on:
            self._sigmas_on[device] = [s.to(device) for s in self._step_sigmas]
        return self._sigmas_on[device]

    @property
    def frames_per_block(self) -> int:
        return self.stream_config.num_frame_per_block

    def new_state(
        self,
        batch_size: int,
        latent_hw: tuple[int, int],
        num_frames: int,
        cache_frames: int | None = None,
        debug: bool = False,
        track_frames: bool = False,
    ) -> AnyStreamState:
        """Fresh cache, bank and text cache for one video (`cache_frames` and the bookkeeping
        flags: see StreamState)."""
        if self.stream_config.static_shapes:
            return StaticStreamState(
                self.generator.config, self.stream_config, batch_size, *latent_hw,
                num_frames=num_frames, dtype=self.dtype, device=self.generator.device,
                debug=debug, track_frames=track_frames,
            )
        return StreamState(
            self.generator.config, self.stream_config, batch_size, *latent_hw,
            num_frames=num_frames, dtype=self.dtype, device=self.generator.device,
            cache_frames=cache_frames, debug=debug, track_frames=track_frames,
        )

    def step_indices(self, steps: Sequence[int] | None) -> tuple[int, ...]:
        """`steps` (indices into the step list) checked: increasing, within the list, at least
        one; None: all of them."""
        every = tuple(range(len(self.step_times)))
        if steps is None:
            return every
        steps = tuple(steps)
        if not steps or any(i not in every for i in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"denoising steps must be increasing indices into the "
                             f"{len(every)}-step list, at least one; got {list(steps)}")
        return steps

    def chunk_start(self, state: AnyStreamState, chunk: int) -> int:
        """The first latent frame of chunk `chunk`: after the state's prefix (a start image or
        video, `commit_prefix`), chunks of `frames_per_block` frames."""
        return state.prefix_frames + chunk * self.frames_per_block

    @torch.no_grad()
    def commit_prefix(self, state: AnyStreamState, latents: torch.Tensor,
                      context: torch.Tensor) -> None:
        """Commit clean latents [B, P, C, h, w] (an encoded start image, P = 1, or the last
        frames of a video) as the stream's first frames, before chunk 0: one clean call at
        t = context_noise, as a generated chunk's commit, without a bank prototype (the bank
        records generated chunks). The sink is their first frames; chunk 0 starts at frame P."""
        if state.prefix_frames or state.text.complete:
            raise ValueError("a prefix is committed first, into a fresh stream state")
        window = self.stream_config.local_attn_size
        frames = latents.shape[1]
        if not 0 < frames or (window != -1 and frames > window):
            raise ValueError(f"a start of {frames} latent frames does not fit the attention "
                             f"window of {window}")
        x = latents.to(self.generator.device, self.dtype)
        self.dit(state, x, float(self.sampling.context_noise), context,
                 StreamCall.commit_chunk(0, record_memory=False))
        state.prefix_frames = frames

    def num_chunks(self, num_frames: int) -> int:
        """Number of chunks; the video must be a whole number of chunks."""
        if num_frames <= 0 or num_frames % self.frames_per_block:
            raise ValueError(
                f"num_output_frames ({num_frames}) must be a positive multiple of "
                f"num_frame_per_block ({self.frames_per_block})"
            )
        return num_frames // self.frames_per_block

    def dit(
        self,
        state: AnyStreamState,
        x: torch.Tensor,
        t: float,
        context: torch.Tensor,
        call: StreamCall,
    ) -> torch.Tensor:
        """One DiT call on [B, F, C, h, w] latents (one timestep for every frame) through the
        stream. Text K/V come from the cache, except in a call that records a graph: there they
        are recomputed with gradient, so the text embedding and the cross-attention K/V
        projections train whatever the exit step, and the cache is left as it is (both as the
        reference's checkpointed path: a refresh before the next call still scores with what the
        cache held, all zeros right after a switch in compat mode)."""
        if call.refresh_memory:
            if state.config.memory.text_keys_before_refresh:
                self.prepare_text(state, context)
            state.refresh_memory(call)
        if not torch.is_grad_enabled():
            self.prepare_text(state, context)
        b, f = x.shape[:2]
        carried = state.call_frames(call, f)
        if carried > f:  # a static state's fixed shape: padding frames, computed and dropped
            x = torch.cat([x, x.new_zeros(b, carried - f, *x.shape[2:])], dim=1)
        timestep = torch.full((b, carried), t, dtype=torch.float32, device=x.device)
        text = {"context": context} if torch.is_grad_enabled() else {"text_kv": state.text.kv}
        ctx = state.begin(call, f)
        flow = self.generator(x.permute(0, 2, 1, 3, 4), timestep, stream=ctx, **text)
        state.finish(ctx)
        return flow.permute(0, 2, 1, 3, 4)[:, :f]

    def prepare_text(self, state: AnyStreamState, context: torch.Tensor) -> None:
        """Build the text cache for this prompt unless it holds one (never with a graph)."""
        if state.text.complete:
            return
        with torch.no_grad():
            state.text.fill(
                self.generator.text_kv(context), text_mask(context, self.generator.config.text_len)
            )

    def denoise(
        self,
        state: AnyStreamState,
        chunk: int,
        x: torch.Tensor,
        context: torch.Tensor,
        noise: NoiseSource,
        exit_step: int | None = None,
        grad: bool = False,
        steps: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Denoise one chunk's noisy latents [B, F, C, h, w]; returns x0 of the last step run
        (`exit_step`, default the last of the list). With `grad`, that call records a graph and
        every earlier one runs without. `steps`: indices of the step list to run, in order (a
        live session's fewer steps; default all). Never writes the cache; remembers the exit
        step on the state for the commit."""
        chosen = self.step_indices(steps)
        times = [self.step_times[i] for i in chosen]
        last = len(times) - 1 if exit_step is None else exit_step
        if not 0 <= last < len(times):
            raise ValueError(f"exit step {exit_step} is outside the {len(times)} denoising steps")
        start = self.chunk_start(state, chunk)
        b, f = x.shape[:2]
        sigmas = [self.step_sigmas(x.device)[i] for i in chosen]
        for i in range(last + 1):
            with torch.set_grad_enabled(grad and i == last):
                call = StreamCall.denoise(start, refresh_memory=(i == 0))
                flow = self.dit(state, x, times[i], context, call)
                x0 = x0_from_flow(flow.flatten(0, 1), x.flatten(0, 1), sigmas[i])
            if i < last:
                eps = noise.step(chunk, i, tuple(x0.shape)).to(x0.device, x0.dtype)
                x = noised(x0, eps, sigmas[i + 1]).unflatten(0, (b, f))
        state.exit_step = last
        return x0.unflatten(0, (b, f))

    @torch.no_grad()
    def commit(
        self,
        state: AnyStreamState,
        chunk: int,
        x0: torch.Tensor,
        context: torch.Tensor,
        noise: NoiseSource,
    ) -> None:
        """Re-run the clean chunk at t = context_noise to write its K/V (and stage a bank
        prototype). Inference feeds x0 as it is (the reference adds no noise there); a noise
        source that draws context noise (training) re-noises x0 to context_noise first.

        With `MemoryOptions.commit_refreshes_after_step0_exit` (compat), the commit of a chunk
        whose denoise exited at step 0 refreshes the bank first, exactly as that step-0 call did:
        the reference's re-run inherits the last denoising call's q_bank flag (TRAINING.md §10
        item 5), so a full bank is compressed once more (§5.8)."""
        b, f = x0.shape[:2]
        x = x0.detach()
        t = self.sampling.context_noise
        eps = noise.context(chunk, (b * f, *x.shape[2:]))
        if eps is not None:
            t_all = torch.full((b * f,), float(t))
            x = self.scheduler.add_noise(x.flatten(0, 1), eps.to(x.device, x.dtype), t_all)
            x = x.unflatten(0, (b, f))
        refresh = state.exit_step == 0 and state.config.memory.commit_refreshes_after_step0_exit
        state.exit_step = None
        call = StreamCall.commit_chunk(
            self.chunk_start(state, chunk), record_memory=state.wants_record(chunk),
            refresh_memory=refresh,
        )
        self.dit(state, x, t, context, call)

    def step(self, state: AnyStreamState, chunk: int, x: torch.Tensor, context: torch.Tensor,
             noise: NoiseSource, exit_step: int | None = None, grad: bool = False,
             hooks: ChunkHooks | None = None, steps: Sequence[int] | None = None) -> torch.Tensor:
        """One chunk from its initial noise `x`: `denoise` (over `steps` of the list, default
        all), `hooks.on_chunk`, `commit`, `hooks.after_commit`; returns its x0. The one
        per-chunk procedure: `rollout` runs it for every chunk and a live session once per
        `next_chunk`, so both make the same calls."""
        x0 = self.denoise(state, chunk, x, context, noise, exit_step, grad, steps)
        every = [*self.hooks, *([hooks] if hooks is not None else [])]
        for h in every:
            if h.on_chunk is not None:
                h.on_chunk(chunk, x0)
        self.commit(state, chunk, x0, context, noise)
        for h in every:
            if h.after_commit is not None:
                h.after_commit(chunk)
        return x0

    @torch.no_grad()
    def switch_prompt(
        self,
        state: AnyStreamState,
        chunk: int,
        recent: torch.Tensor,
        context: torch.Tensor,
        switch: SwitchOptions,
        frames: int | None = None,
    ) -> None:
        """Switch to `context` before chunk `chunk` (spec §6.3): drop the text cache and re-encode
        the last committed frames with the new prompt (refreshing the bank), so the window
        speaks the new prompt.

        `recent` [B, n, C, h, w]: committed clean latents whose last frame is the one just before
        the chunk (inference passes every frame so far). `frames`: how many of them to re-encode;
        by default the attention window, min(local_attn_size, chunk start), as inference does
        (stage-2 training in compat mode passes the reference's 21-frame training window).
        """
        start = self.chunk_start(state, chunk)
        if not switch.global_sink:
            state.clear_cache_values()
        state.text.reset()
        if start == 0:
            return
        cap = self.stream_config.local_attn_size
        if frames is None:
            frames = start if cap == -1 else min(cap, start)
        frames = min(frames, start)
        if recent.shape[1] < frames:
            raise ValueError(f"a switch at frame {start} re-encodes {frames} frames, got {recent.shape[1]}")
        call = StreamCall.recache_frames(
            start - frames, refresh_memory=True, protect_sink=switch.protect_sink_at_start
        )
        self.dit(state, recent[:, recent.shape[1] - frames :], 0.0, context, call)
        state.text.reset()

    def chunk_noise(
        self, noise: NoiseSource, chunk: int, batch_size: int, latent_hw: tuple[int, int]
    ) -> torch.Tensor:
        """Chunk `chunk`'s initial noise [B, F_chunk, C, h, w] from a per-chunk source, drawn
        when the chunk starts (after any prompt switch, before its step noise): the one draw
        that lets a live session match an offline rollout with the same seed."""
        shape = (batch_size, self.frames_per_block, self.generator.config.in_dim, *latent_hw)
        return noise.chunk_initial(chunk, shape).to(self.generator.device, self.dtype)

    def prompt_switches(self, contexts: Mapping[int, torch.Tensor],
                        transitions: Mapping[int, Transition] | None = None) -> BeforeChunk:
        """A `before_chunk` hook that asks for `contexts[n]` from chunk n on, as interactive
        inference does: at once (the stream switches with recache) or as `transitions[n]` says;
        other chunks keep their prompt."""
        transitions = transitions or {}

        def before_chunk(n: int, stream: Stream) -> None:
            if n in contexts:
                stream.set_prompt(contexts[n], transition=transitions.get(n, Transition()))

        return before_chunk

    def runtime_controls(self, changes: Sequence[ControlChange]) -> BeforeChunk:
        """A `before_chunk` hook that replays a live session's runtime controls: at each
        change's chunk, its denoising steps and / or its reseed."""
        by_chunk = {change.chunk: change for change in changes}

        def before_chunk(n: int, stream: Stream) -> None:
            change = by_chunk.get(n)
            if change is not None and change.steps is not None:
                stream.set_steps(change.steps)
            if change is not None and change.seed is not None:
                stream.reseed(change.seed)

        return before_chunk

    def recent_frames(self, recache_frames: int | None = None) -> int | None:
        """Latents a stream keeps for a switch's recache: the attention window, or
        `recache_frames` if more (None: all of them, under global attention)."""
        window = self.stream_config.local_attn_size
        return None if window == -1 else max(window, recache_frames or 0)

    def rollout(
        self,
        context: torch.Tensor,
        num_frames: int,
        latent_hw: tuple[int, int],
        noise: NoiseSource,
        *,
        first_chunk: int = 0,
        exit_step: ExitStep = None,
        grad: GradRule = False,
        hooks: ChunkHooks | None = None,
        progress: bool = False,
        state: AnyStreamState | None = None,
        switch: SwitchOptions | None = None,
        recache_frames: int | None = None,
        recent: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate `num_frames` latent frames [B, num_frames, C, h, w] for the prompt embedding
        `context` [B, T, text_dim], chunk by chunk from chunk `first_chunk`: a loop over a
        `Stream`'s `next_chunk`.

        A rollout from chunk 0 makes a fresh state unless given one; a later first chunk
        continues `state`, which holds the chunks before it (a stage-2 window; `recent`: its
        latents before `first_chunk`, for a switch's recache). `exit_step`: the last denoising
        step, one for every chunk or a rule of the (absolute) chunk index (None: all steps);
        `grad`: whether a chunk's exit call records a graph, likewise a value or a rule.
        `hooks.before_chunk` may ask for prompts before any chunk (see `ChunkHooks`); `switch`
        and `recache_frames` say how the stream switches (see `switch_prompt`). The initial
        noise is drawn in the source's `order`: for all of the rollout's frames before its first
        chunk (``upfront``, the reference's) or each chunk's as it starts (``per_chunk``, then
        addressed by absolute chunk index). `prefix`: clean latents a fresh stream starts from
        (`Stream`; they are not part of the returned latents).
        """
        batch_size = context.shape[0]
        chunks_here = self.num_chunks(num_frames)
        if state is None and first_chunk:
            raise ValueError(f"a rollout from chunk {first_chunk} continues a stream: pass its "
                             "state")
        upfront = None
        if noise.order == "upfront":
            shape = (batch_size, num_frames, self.generator.config.in_dim, *latent_hw)
            upfront = noise.initial(shape).to(self.generator.device, self.dtype)
        stream = Stream(self, context, noise, latent_hw=latent_hw, num_frames=num_frames,
                        state=state, first_chunk=first_chunk, switch=switch,
                        recache_frames=recache_frames, recent=recent, prefix=prefix)
        fpb = self.frames_per_block
        chunks: list[torch.Tensor] = []
        for j in tqdm(range(chunks_here), desc="chunks", disable=not progress, leave=False):
            n = stream.chunk
            k = exit_step(n) if callable(exit_step) else exit_step
            g = grad(n) if callable(grad) else grad
            x = None if upfront is None else upfront[:, j * fpb : (j + 1) * fpb]
            chunks.append(stream.next_chunk(x, exit_step=k, grad=g, hooks=hooks))
        return torch.cat(chunks, dim=1)
