"""Stage-2 streaming long tuning: long self-rollouts consumed window by window (TRAINING.md §5).

A `LongSequence` is one long rollout of up to `max_length` latent frames on a prompt pair (A, B).
It is generated window by window, its KV cache and memory bank carried from one window to the
next, so the student is supervised on long self-generated contexts while the teacher and the
critic only ever see one `window_frames`-frame window (21, about 5 s):

* the first window generates `window_frames` new frames; every later one `n_new` new frames
  (drawn among the multiples of the chunk size in [min_new_frames, window_frames)) after an
  overlap of `window_frames - n_new` frames of the previous window (§5.2);
* the first latent of every later window is replaced by the VAE's image latent of its decoded
  frame (`FirstFrameEncoder`), so the window looks like a real clip to the bidirectional teacher;
* the sequence switches from A to B once, at frame `switch_frame` (§5.5): in the chunk loop's
  `before_chunk` hook the text cache is dropped and the recent frames are re-encoded with B
  through the stepper's `switch_prompt`, the same recache as interactive inference (§5.7);
  windows from the switch on use and are judged against B (§5.6);
* the bank records every `record_interval` chunks, as at inference, and persists across windows
  and across the switch; the sink survives the switch (clean) or is zeroed (compat, §10 item 1).

A window is one `ChunkStepper.rollout` from the window's first chunk on the sequence's state,
with one exit step for its chunks and a gradient rule: gradients flow only through each new
chunk's exit-step call of a generator window (earlier windows, the overlap, the chunks before
the switch in the switch window and the re-encoded first latent are constants), and the cache
is sized `local_attn_size + window_frames` frames so that every chunk of the window being
trained keeps the exact context its forward saw (copy-on-write cache and bank: checkpoint
recomputation is exact, §10 item 6).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from config.schema import LongTuningKeys, TrainConfig
from config.stream import whole_chunks
from memflow.chunk_loop import ChunkHooks, ChunkStepper
from memflow.config import SwitchOptions
from memflow.errors import InputError
from memflow.noise import NoiseSource
from memflow.stream import Stream

from .draws import SequenceDraws, TrainingDraws
from .rollout import exit_interval

SwitchMode = Literal["random_choice", "fixed", "random"]
FirstFrameEncoder = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Settings and schedules (pure functions: the window table and the switch choice)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwitchSchedule:
    """Where a sequence switches prompts (TRAINING.md §5.5), in latent frames.

    random_choice: uniform over `choices` below the sequence length (released);
    fixed: always `fixed_index`;
    random: uniform over range(min_index, max_index, frames_per_block) below the length
    (`min_index` when min == max)."""

    mode: SwitchMode = "random_choice"
    choices: tuple[int, ...] = ()
    fixed_index: int = 21
    min_index: int | None = None
    max_index: int | None = None

    def candidates(self, max_length: int, frames_per_block: int) -> list[int]:
        """Every switch frame this schedule may draw for a sequence of `max_length` frames."""
        if self.mode == "random_choice":
            found = list(self.choices)
        elif self.mode == "fixed":
            found = [self.fixed_index]
        else:
            lo, hi = self.min_index, self.max_index
            found = [lo] if lo == hi else list(range(lo, hi, frames_per_block))
        return [p for p in found if 0 < p < max_length]

    def draw(self, max_length: int, frames_per_block: int, draws: SequenceDraws) -> int:
        """The switch frame of a sequence of `max_length` frames, chosen by `draws`."""
        found = self.candidates(max_length, frames_per_block)
        if not found:
            raise ValueError(f"no switch frame below the sequence length {max_length} ({self})")
        return draws.switch_frame(found)


def _switch_schedule(c: TrainConfig, fpb: int) -> tuple[SwitchSchedule, str, list[int]]:
    """The stage-2 switch rule, the key that sets it and its candidate switch frames."""
    if c.switch_mode == "random_choice":
        if not c.switch_choices:
            raise InputError(f"config key `switch_choices` must be a list of latent frames, "
                             f"got {c.switch_choices!r}")
        return (SwitchSchedule("random_choice", choices=tuple(c.switch_choices)), "switch_choices",
                list(c.switch_choices))
    if c.switch_mode == "fixed":
        fixed = SwitchSchedule("fixed").fixed_index if c.fixed_switch_index is None else c.fixed_switch_index
        return SwitchSchedule("fixed", fixed_index=fixed), "fixed_switch_index", [fixed]
    lo, hi = c.min_switch_frame_index, c.max_switch_frame_index
    for key, value in (("min_switch_frame_index", lo), ("max_switch_frame_index", hi)):
        if value is None:
            raise InputError(f"config key `{key}` must be set with switch_mode: random")
    if hi < lo:
        raise InputError(f"config key `max_switch_frame_index` must be >= {lo}, got {hi}")
    schedule = SwitchSchedule("random", min_index=lo, max_index=hi)
    return schedule, "min_switch_frame_index", schedule.candidates(10**9, fpb)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _start_images(folder: str | None) -> tuple[Path, ...]:
    """The images of `start_images` (a folder), in name order; none is an error."""
    if folder is None:
        return ()
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"config key `start_images`: {path} is not a folder")
    images = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
    if not images:
        raise InputError(f"config key `start_images`: no images ({', '.join(IMAGE_SUFFIXES)}) in "
                         f"{path}")
    return images


def _sequence_lengths(c: TrainConfig, window: int) -> tuple[int, tuple[int, ...]]:
    """(max_length, the lengths a sequence may draw); absent, the reference's fallback."""
    max_length = REFERENCE_FALLBACK_MAX_LENGTH if c.streaming_max_length is None else c.streaming_max_length
    if max_length < window:
        raise InputError(f"config key `streaming_max_length` ({max_length}) must be at least "
                         f"streaming_chunk_size ({window})")
    possible = c.streaming_possible_max_length
    if possible is not None and (not possible or any(v < window for v in possible)):
        raise InputError(
            f"config key `streaming_possible_max_length` must be a list of lengths >= "
            f"streaming_chunk_size ({window}), got {possible!r}"
        )
    return max_length, tuple(possible or ())


# the sequence length of the reference's streaming model when its config sets none
REFERENCE_FALLBACK_MAX_LENGTH = 57


@dataclass(frozen=True)
class LongTuningConfig:
    """Stage-2 settings (TRAINING.md §1.2 "Stage-2 only"), in latent frames.

    `recache_frames`: frames re-encoded at the switch; None follows interactive inference
    (the attention window, min(local_attn_size, switch frame)), compat mode passes the
    reference's training window (21, §10 item 27). `refresh_text_per_window`: rebuild the
    prompt's cross-attention K/V at every window, so no-grad calls use the current weights
    (the reference keeps the K/V of the sequence's first window until the switch)."""

    window_frames: int = LongTuningKeys.streaming_chunk_size
    max_length: int = REFERENCE_FALLBACK_MAX_LENGTH
    possible_max_lengths: tuple[int, ...] = ()
    min_new_frames: int = LongTuningKeys.streaming_min_new_frame
    train_first_chunk: bool = LongTuningKeys.train_first_chunk
    switch: SwitchSchedule = SwitchSchedule()
    switch_options: SwitchOptions = SwitchOptions()
    recache_frames: int | None = None
    refresh_text_per_window: bool = True
    start_images: tuple[Path, ...] = ()  # images sequences start from (sequence i: i mod n)

    @classmethod
    def from_config(cls, c: TrainConfig, compat: bool) -> LongTuningConfig:
        """From a typed training config's stage-2 keys (TRAINING.md §1.2, §5): the window schedule,
        the sequence lengths and the switch rule, each checked against the others."""
        fpb = c.num_frame_per_block
        window = whole_chunks("streaming_chunk_size", c.streaming_chunk_size, fpb)
        min_new = whole_chunks("streaming_min_new_frame", c.streaming_min_new_frame, fpb)
        if window < fpb or min_new < fpb:
            raise InputError(f"config keys `streaming_chunk_size` and `streaming_min_new_frame` must "
                             f"hold at least one chunk ({fpb} frames)")
        if min_new >= window:
            raise InputError(
                f"config key `streaming_min_new_frame` ({min_new}) must be smaller than "
                f"streaming_chunk_size ({window}): later windows overlap the previous one"
            )
        max_length, possible = _sequence_lengths(c, window)
        schedule, switch_key, frames = _switch_schedule(c, fpb)
        for p in frames:
            if p <= 0 or p % fpb:
                raise InputError(
                    f"config key `{switch_key}`: switch frame {p} must be a positive multiple of "
                    f"num_frame_per_block ({fpb})"
                )
        for length in possible or (max_length,):
            if not schedule.candidates(length, fpb):
                raise InputError(
                    f"config key `{switch_key}`: no switch frame below streaming_max_length "
                    f"({length}); every sequence needs one"
                )
        if compat:
            switch = SwitchOptions.compat(global_sink=False)  # the reference ignores global_sink (§10.1)
        elif not c.global_sink:
            raise InputError("config key `global_sink`: false (an all-zero sink after the switch) "
                             "exists only as the reference's bug, under behaviour: compat")
        else:
            switch = SwitchOptions()
        return cls(
            window_frames=window,
            max_length=max_length,
            possible_max_lengths=possible,
            min_new_frames=min_new,
            train_first_chunk=c.train_first_chunk,
            switch=schedule,
            switch_options=switch,
            recache_frames=window if compat else None,
            refresh_text_per_window=not compat,
            start_images=_start_images(c.start_images),
        )

    def start_image(self, index: int) -> Path | None:
        """The image sequence `index` starts from, if the run starts sequences from images."""
        return self.start_images[index % len(self.start_images)] if self.start_images else None

    def cache_frames(self, local_attn_size: int) -> int | None:
        """KV buffer of a sequence: the attention span plus a whole window (§5.3), so that the
        backward pass of any chunk of the window in training re-reads its forward context."""
        return None if local_attn_size == -1 else local_attn_size + self.window_frames


def can_generate_more(generated: int, max_length: int, min_new_frames: int) -> bool:
    """Whether a sequence that holds `generated` frames can produce another window (§5.2)."""
    return generated < max_length and generated + min_new_frames <= max_length


def new_frame_choices(generated: int, max_length: int, config: LongTuningConfig,
                      frames_per_block: int) -> list[int]:
    """The possible numbers of new frames of the next window: the whole window first, then
    multiples of the chunk in [min_new_frames, min(max_length - generated + 1, window))."""
    if generated == 0:
        return [config.window_frames]
    top = min(max_length - generated + 1, config.window_frames)
    return list(range(config.min_new_frames, top, frames_per_block))


def window_schedule(max_length: int, config: LongTuningConfig, frames_per_block: int,
                    choose: Callable[[list[int]], int] = lambda c: c[0]) -> list[tuple[int, int]]:
    """(start frame, new frames) of every window of one sequence (§5.2's table)."""
    out, generated = [], 0
    while can_generate_more(generated, max_length, config.min_new_frames):
        n_new = choose(new_frame_choices(generated, max_length, config, frames_per_block))
        out.append((generated, n_new))
        generated += n_new
    return out


# ------------------------------------------------------------------------------------------------
# One sequence
# ------------------------------------------------------------------------------------------------
@dataclass
class Window:
    """One window for the losses: latents [B, window_frames, C, h, w] (graph into the generator
    for a generator window), the gradient mask (None: every frame), the prompt embedding the
    losses use (the one active at the window's end, §5.6) and its bookkeeping."""

    latents: torch.Tensor
    gradient_mask: torch.Tensor | None
    cond: torch.Tensor
    start_frame: int
    new_frames: int
    exit_step: int
    denoised_timestep_from: int
    denoised_timestep_to: int
    switched_here: bool
    uses_switch_prompt: bool


class WindowNoise(NoiseSource):
    """A window's noise addressed by block of the window: the stepper asks for absolute chunk
    n, the window's draws answer for block n - first_chunk, so recorded draws are stored per
    window and block whatever the window's depth in the sequence."""

    def __init__(self, noise: NoiseSource, first_chunk: int):
        self.noise = noise
        self.first_chunk = first_chunk

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.noise.initial(shape)

    def step(self, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.noise.step(chunk - self.first_chunk, step, shape)

    def context(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.noise.context(chunk - self.first_chunk, shape)


class LongSequence:
    """The state of one long rollout between windows (§5.1): stream state, frames generated so
    far, the previous window's raw latents, the prompt pair and the switch."""

    def __init__(
        self,
        stepper: ChunkStepper,
        config: LongTuningConfig,
        *,
        prompts: list[str],
        switch_prompts: list[str],
        cond: torch.Tensor,
        switch_cond: torch.Tensor,
        latent_hw: tuple[int, int],
        max_length: int,
        switch_frame: int,
        index: int,
        reencode: FirstFrameEncoder,
        track_frames: bool = False,
        start: torch.Tensor | None = None,
    ):
        """`start`: clean latents [B, 1, C, h, w] of an image the sequence starts from (committed
        first, before chunk 0); its first window then is [that latent, the last
        window_frames - 1 new frames], trained on the new ones, as a later window is with its
        re-encoded first frame."""
        self.stepper = stepper
        self.config = config
        self.prompts, self.switch_prompts = list(prompts), list(switch_prompts)
        self.cond, self.switch_cond = cond, switch_cond
        self.latent_hw = latent_hw
        self.max_length = max_length
        self.switch_frame = switch_frame
        self.index = index
        self.reencode = reencode
        cache = config.cache_frames(stepper.stream_config.local_attn_size)
        self.state = stepper.new_state(cond.shape[0], latent_hw, max_length, cache_frames=cache,
                                       track_frames=track_frames)
        self.generated = 0
        self.switched = False
        self.previous: torch.Tensor | None = None
        if start is not None:
            stepper.commit_prefix(self.state, start, cond)
            self.previous = start.to(cond.device, cond.dtype)
        self.recaches = 0

    @property
    def batch_size(self) -> int:
        return self.cond.shape[0]

    def can_generate_more(self) -> bool:
        return can_generate_more(self.generated, self.max_length, self.config.min_new_frames)

    def next_window(self, draws: TrainingDraws, grad: bool, last_step_only: bool = False) -> Window:
        """Generate the next window's new frames continuing the cache (§5.3) and assemble the
        window (§5.2). Draw order: number of new chunks, noise (addressed by block of the
        window, `WindowNoise`), one exit step for the window (the first of one per block,
        drawn after the window's initial noise)."""
        if not self.can_generate_more():
            raise RuntimeError("the sequence is complete; start a new one")
        stepper, cfg = self.stepper, self.config
        fpb, num_steps = stepper.frames_per_block, len(stepper.timesteps)
        start, first = self.generated, self.generated // fpb
        choices = new_frame_choices(start, self.max_length, cfg, fpb)
        blocks = draws.num_blocks(choices[0] // fpb, choices[-1] // fpb)
        n_new = blocks * fpb
        noise = WindowNoise(draws.rollout_noise(), first_chunk=first)
        switch_at = self.switch_frame - start  # relative; in [0, n_new) for the switch window
        switches_here = not self.switched and 0 <= switch_at < n_new
        exit_steps: list[int] = []

        def exit_step(chunk: int) -> int:
            if not exit_steps:  # at the first chunk: after the window's initial noise
                drawn = num_steps - 1 if last_step_only else draws.exit_steps(blocks, num_steps)[0]
                exit_steps.append(drawn)
            return exit_steps[0]

        def after_switch(chunk: int) -> bool:
            """In the switch window, chunks before the switch are constants of the graph."""
            return not switches_here or (chunk - first) * fpb >= switch_at

        def switch(chunk: int, stream: Stream) -> None:
            """Prompt B from the switch on: the stream recaches the recent raw latents (the
            previous window and this window's chunks so far, not the re-encoded window, §5.7)."""
            if not switches_here or self.switched or not after_switch(chunk):
                return
            stream.set_prompt(self.switch_cond)
            self.switched = True
            self.recaches += 1

        if cfg.refresh_text_per_window:
            self.state.text.reset()
        context = self.switch_cond if self.switched or start >= self.switch_frame else self.cond
        new = stepper.rollout(
            context, n_new, self.latent_hw, noise, first_chunk=first, exit_step=exit_step,
            grad=lambda chunk: grad and after_switch(chunk), hooks=ChunkHooks(before_chunk=switch),
            state=self.state, switch=cfg.switch_options, recache_frames=cfg.recache_frames,
            recent=self.previous,
        )
        return self._window(new, start, exit_steps[0], switches_here)

    def _window(self, new: torch.Tensor, start: int, exit_step: int, switched_here: bool) -> Window:
        """Assemble the window of `new` frames from `start` (§5.2): the first window is its new
        frames; a later one is the previous window's tail (overlap) plus the new frames, its
        first latent replaced by the re-encoded image latent, trained on the new frames only."""
        cfg = self.config
        n_new = new.shape[1]
        previous = self.previous
        full = new if previous is None else torch.cat([previous, new], dim=1)
        self.previous = full[:, -cfg.window_frames :].detach()
        self.generated = start + n_new
        mask = None
        if previous is None:
            window = full[:, -cfg.window_frames :]
        elif start == 0:  # after a start image: it leads the first window, as a real clip's
            window = torch.cat([previous, new[:, -(cfg.window_frames - 1) :]], dim=1)
            mask = torch.ones(window.shape, dtype=torch.bool, device=window.device)
            mask[:, 0] = False
        else:
            overlap = cfg.window_frames - n_new
            image = self.reencode(full[:, : n_new + 1].detach()).to(new.device, new.dtype)
            window = torch.cat([image, full[:, -(cfg.window_frames - 1) :]], dim=1)
            mask = torch.zeros(window.shape, dtype=torch.bool, device=window.device)
            mask[:, overlap:] = True
        t_from, t_to = exit_interval(self.stepper, exit_step)
        uses_b = self.switched or start >= self.switch_frame
        return Window(
            latents=window, gradient_mask=mask, cond=self.switch_cond if uses_b else self.cond,
            start_frame=start, new_frames=n_new, exit_step=exit_step,
            denoised_timestep_from=t_from, denoised_timestep_to=t_to,
            switched_here=switched_here, uses_switch_prompt=uses_b,
        )

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this sequence bit for bit after a restart (the prompt
        embeddings are re-encoded from the saved prompts)."""
        return {
            "prompts": self.prompts, "switch_prompts": self.switch_prompts,
            "max_length": self.max_length, "switch_frame": self.switch_frame,
            "index": self.index, "generated": self.generated, "switched": self.switched,
            "recaches": self.recaches, "previous": self.previous, "stream": self.state.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generated, self.switched = int(state["generated"]), bool(state["switched"])
        self.recaches = int(state["recaches"])
        prev = state["previous"]
        self.previous = None if prev is None else prev.to(self.cond.device, self.stepper.dtype, copy=True)
        self.state.load_state_dict(state["stream"])


def vae_first_frame_encoder(vae: Any) -> FirstFrameEncoder:
    """§5.2's re-encoding with the project's VAE: decode the clip [B, f, C, h, w] from a fresh
    causal state (the last pixel frame depends on the whole clip), take its last pixel frame
    and encode it alone: a one-frame image latent [B, 1, C, h, w]."""

    @torch.no_grad()
    def encode(clip: torch.Tensor) -> torch.Tensor:
        pixels = vae.decode(clip.to(vae.dtype))
        return vae.encode(pixels[:, -1:])

    return encode
