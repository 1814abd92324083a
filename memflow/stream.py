"""One streaming video, driven chunk by chunk: the object every caller of the chunk loop drives.

Offline inference (single and interactive), the live session, stage-1 rollouts, stage-2 windows,
the training videos and the benchmarks all generate through a `Stream`:

    stream = Stream(stepper, context, noise, latent_hw=(60, 104), num_frames=120)
    x0 = stream.next_chunk()              # chunk 0: [B, F, C, h, w]
    stream.set_prompt(context_b, "b")     # from the next chunk boundary on (any thread)
    x0 = stream.next_chunk()              # chunk 1, under b: switched with recache first

A prompt change is a wish recorded by `set_prompt` and applied by the next `next_chunk`, before
the chunk draws its noise: the last wish before a boundary wins (one switch per chunk), and a
wish for the prompt in effect (same label) cancels a pending one. Applying it after chunk 0 is
the recache of interactive inference (`ChunkStepper.switch_prompt`: text cache dropped, the last
committed frames re-encoded under the new prompt), for which the stream keeps its most recent
latents; before chunk 0 the new prompt simply replaces the first. The stream records when each
prompt took effect (`timeline`).

A change with a `Transition` of N > 0 chunks moves the conditioning instead: chunk k of the
transition (k = 1..N) is conditioned on `blend_embeddings(old, new, k / N)`, so the N chunks get
N distinct conditionings and the last is exactly the new prompt's. Only the text cache is
rebuilt at each of those chunks; nothing is re-encoded (no recache): the window keeps the K/V it
was generated with, which is what a gradual change wants. A change asked for during a transition
starts from the conditioning of the last chunk.

Invariants: `chunk` is the next chunk to generate; `recent` holds the last committed latents
(at most `recent_frames`: the attention window, all of them under global attention); the state's
cache holds chunks < `chunk`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

import torch

from .config import SwitchOptions
from .noise import NoiseSource
from .prompt_blend import Transition, blend_embeddings
from .static_stream import AnyStreamState

PromptInput = torch.Tensor | Callable[[], torch.Tensor]


class ChunkRunner(Protocol):
    """What a stream needs of `memflow.chunk_loop.ChunkStepper` (which builds streams itself, so
    this module does not import it)."""

    frames_per_block: int
    hooks: list[Any]  # the stepper-wide `ChunkHooks`

    def new_state(self, batch_size: int, latent_hw: tuple[int, int],
                  num_frames: int) -> AnyStreamState: ...

    def chunk_noise(self, noise: NoiseSource, chunk: int, batch_size: int,
                    latent_hw: tuple[int, int]) -> torch.Tensor: ...

    def step(self, state: AnyStreamState, chunk: int, x: torch.Tensor, context: torch.Tensor,
             noise: NoiseSource, exit_step: int | None, grad: bool,
             hooks: Any, steps: Sequence[int] | None = None) -> torch.Tensor: ...

    def step_indices(self, steps: Sequence[int] | None) -> tuple[int, ...]: ...

    def recent_frames(self, recache_frames: int | None = None) -> int | None: ...

    def switch_prompt(self, state: AnyStreamState, chunk: int, recent: torch.Tensor,
                      context: torch.Tensor, switch: SwitchOptions,
                      frames: int | None = None) -> None: ...

    def commit_prefix(self, state: AnyStreamState, latents: torch.Tensor,
                      context: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class PromptChange:
    """From latent frame `latent_frame` (chunk `chunk`) on, the stream follows prompt `label`.
    `request`: what the caller of `set_prompt` attached to its wish (e.g. when and where it was
    asked for); not part of the video, so not compared."""

    chunk: int
    latent_frame: int
    label: Hashable
    request: Any = field(default=None, compare=False)
    transition: Transition = Transition()


@dataclass(frozen=True)
class _Wish:
    prompt: PromptInput
    label: Hashable
    request: Any
    transition: Transition


@dataclass(frozen=True)
class ControlChange:
    """At chunk `chunk` the stream began to denoise over `steps` (indices of the step list; None:
    unchanged), and / or its noise was reseeded with `seed` (None: not)."""

    chunk: int
    steps: tuple[int, ...] | None = None
    seed: int | None = None


@dataclass
class _Moving:
    """A transition in progress: `done` of its chunks have been conditioned so far."""

    source: torch.Tensor
    target: torch.Tensor
    transition: Transition
    done: int = 0


class Stream:
    """A video under generation: its state, noise, prompt in effect, pending switch and recent
    latents. Generation (`next_chunk`) runs on one thread at a time; `set_prompt` and the
    read-only properties may be used from any thread."""

    def __init__(
        self,
        stepper: ChunkRunner,
        context: torch.Tensor,
        noise: NoiseSource,
        *,
        latent_hw: tuple[int, int],
        num_frames: int | None = None,
        state: AnyStreamState | None = None,
        first_chunk: int = 0,
        label: Hashable = None,
        switch: SwitchOptions | None = None,
        recache_frames: int | None = None,
        recent: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ):
        """`state`: the stream's `StreamState`, or None for a fresh one of `num_frames` frames
        (then `first_chunk` must be 0). `recache_frames`: frames a switch re-encodes (None: the
        attention window, see `ChunkStepper.switch_prompt`); the stream keeps that many latents
        for it (`ChunkStepper.recent_frames`: all of them only under global attention).
        `recent`: latents committed before `first_chunk`
        (a stage-2 window continuing a sequence). `prefix`: clean latents [B, P, C, h, w] the
        fresh stream starts from (an encoded image, or a video's last frames), committed now as
        its first frames (`ChunkStepper.commit_prefix`); chunks follow them."""
        if state is None:
            if first_chunk:
                raise ValueError(f"a stream from chunk {first_chunk} continues a state: pass it")
            if num_frames is None:
                raise ValueError("a fresh stream needs num_frames (the cache's size)")
            state = stepper.new_state(context.shape[0], latent_hw, num_frames)
        self.stepper, self.state, self.noise = stepper, state, noise
        self.latent_hw = latent_hw
        self.batch_size = context.shape[0]
        self.context, self.label = context, label
        self.switch = switch or SwitchOptions()
        self.recent_frames = stepper.recent_frames(recache_frames)
        self.recache_frames = recache_frames
        self.recent = recent
        self.first_chunk = first_chunk
        self.chunk = first_chunk
        self.timeline = [PromptChange(first_chunk, first_chunk * stepper.frames_per_block, label)]
        if prefix is not None:
            if first_chunk or recent is not None:
                raise ValueError("a prefix starts a fresh stream")
            stepper.commit_prefix(self.state, prefix, context)
            self.recent = prefix.to(context.device)
        self.switched = False  # the last chunk began with a prompt switch (with recache)
        self.last_change: PromptChange | None = None  # the change the last chunk began with
        self._wish: _Wish | None = None
        self._moving: _Moving | None = None
        self.steps: tuple[int, ...] | None = None  # the step list's indices run (None: all)
        self.controls: list[ControlChange] = []  # runtime changes of steps and seed, in order
        self._control_wish: dict[str, Any] = {}
        self._lock = threading.Lock()

    # -- prompts --------------------------------------------------------------------------------
    def set_prompt(self, prompt: PromptInput, label: Hashable = None, request: Any = None,
                   transition: Transition = Transition()) -> None:
        """Ask for `prompt` (an embedding, or a function that makes one when the switch happens:
        a live caller's text encoder runs on the generation thread) from the next chunk boundary
        on, at once or over `transition.chunks` chunks; `request` comes back on the
        `PromptChange` it becomes. Any thread; never waits for a chunk."""
        with self._lock:
            self._wish = _Wish(prompt, label, request, transition)

    @property
    def pending_label(self) -> Hashable:
        """The label of a prompt that takes effect at the next chunk (None: no switch pending)."""
        with self._lock:
            wish = self._wish
        return None if wish is None or self._same_prompt(wish) else wish.label

    def _same_prompt(self, wish: _Wish) -> bool:
        return wish.label is not None and wish.label == self.label

    def _apply_wish(self) -> PromptChange | None:
        """Take the pending prompt at this boundary: the change made, if any (a switch with
        recache after chunk 0, a new first prompt before it)."""
        with self._lock:
            wish, self._wish = self._wish, None
        if wish is None or self._same_prompt(wish):
            return None
        context = wish.prompt() if callable(wish.prompt) else wish.prompt
        n = self.chunk
        transition = wish.transition if n > 0 else Transition()  # nothing to move from yet
        self._moving = None
        if transition.chunks:
            self._moving = _Moving(self.context, context, transition)
        elif n > 0 or self.state.prefix_frames:  # committed frames speak the old prompt
            self.stepper.switch_prompt(self.state, n, self.recent, context, self.switch,
                                       frames=self.recache_frames)
        if not transition.chunks:
            self.context = context
        self.label = wish.label
        change = PromptChange(n, n * self.stepper.frames_per_block, wish.label, wish.request,
                              transition)
        if n == self.timeline[-1].chunk:  # before any chunk under the last prompt: replace it
            self.timeline = [*self.timeline[:-1], change]
        else:
            self.timeline = [*self.timeline, change]
        return change

    def _move_conditioning(self) -> None:
        """In a transition: this chunk's conditioning, and a text cache rebuilt for it."""
        moving = self._moving
        if moving is None:
            return
        moving.done += 1
        t = moving.transition
        self.context = blend_embeddings(moving.source, moving.target, t.weight(moving.done), t.blend)
        self.state.text.reset()
        if moving.done == t.chunks:
            self._moving = None

    def set_steps(self, steps: Sequence[int] | None) -> None:
        """Denoise over these indices of the step list from the next chunk on (None: all).
        Any thread; checked now."""
        checked = None if steps is None else self.stepper.step_indices(steps)
        with self._lock:
            self._control_wish["steps"] = checked

    def reseed(self, seed: int) -> None:
        """Draw the next chunk's noise (and what follows) from `seed`. Any thread."""
        with self._lock:
            self._control_wish["seed"] = seed

    def _apply_controls(self) -> None:
        with self._lock:
            wish, self._control_wish = self._control_wish, {}
        if not wish:
            return
        if "steps" in wish:
            self.steps = wish["steps"]
        if "seed" in wish:
            self.noise.reseed(wish["seed"])
        steps = self.stepper.step_indices(self.steps) if "steps" in wish else None
        self.controls.append(ControlChange(self.chunk, steps, wish.get("seed")))

    @property
    def in_transition(self) -> bool:
        """Whether the next chunk is still part of a transition."""
        return self._moving is not None

    # -- generation -----------------------------------------------------------------------------
    def next_chunk(
        self,
        x: torch.Tensor | None = None,
        *,
        exit_step: int | None = None,
        grad: bool = False,
        hooks: Any = None,
    ) -> torch.Tensor:
        """Generate and commit the next chunk; returns its x0 [B, F, C, h, w]. Runs the
        `before_chunk` hooks (the stepper's, then `hooks`: a `ChunkHooks`), applies a pending
        prompt, draws the chunk's initial noise (unless `x` is given: a rollout that drew every
        chunk's noise up front), then runs `ChunkStepper.step` with the same hooks."""
        for h in [*self.stepper.hooks, *([hooks] if hooks is not None else [])]:
            if h.before_chunk is not None:
                h.before_chunk(self.chunk, self)
        self.last_change = self._apply_wish()
        self._move_conditioning()
        self._apply_controls()
        n = self.chunk
        self.switched = self.last_change is not None and n > 0
        if x is None:
            x = self.stepper.chunk_noise(self.noise, n, self.batch_size, self.latent_hw)
        x0 = self.stepper.step(self.state, n, x, self.context, self.noise, exit_step, grad, hooks,
                               self.steps)
        self._keep_recent(x0)
        self.chunk = n + 1
        return x0

    def _keep_recent(self, x0: torch.Tensor) -> None:
        x0 = x0.detach()  # only a recache reads them, without gradient
        joined = x0 if self.recent is None else torch.cat([self.recent, x0], dim=1)
        self.recent = joined if self.recent_frames is None else joined[:, -self.recent_frames:]

    @property
    def latent_frames(self) -> int:
        """Latent frames generated in this stream (from its first chunk)."""
        return self.chunk * self.stepper.frames_per_block
