"""The stage-2 training loop: streaming long tuning with prompt switches (TRAINING.md §5.4).

Same trainer as stage 1 (optimisers, update ratio, accumulation, clipping, FSDP, checkpoints,
logging); only the micro-step differs. Instead of a fresh 21-frame rollout per loss, each loss
takes the next window of the rank's current long sequence (`LongSequence`):

  * generator iteration (s % dfake_gen_update_ratio == 0): a window with gradient and its DMD
    loss, then the *next* window without gradient for the critic loss, so it consumes two
    consecutive windows;
  * critic-only iteration: one window, critic loss.

A new sequence (the next prompt pair from the loader, its length and switch frame) starts when
there is none or the current one cannot produce another window. Length and switch frame come
from the run's draws for that sequence number (`RunDraws.sequence`; by default a generator keyed
by (seed, sequence number)), and the number of new frames and the exit step of a window from
the window's draws (`RunDraws.rollout`; by default the iteration's shared generator), so every
rank runs the same number of DiT calls (FSDP collectives) without a broadcast.

A sequence in flight is part of the checkpoint: every rank saves its own (`rank_{r}.pt`: KV
cache, bank, text cache, previous window, position), so a resumed run continues it bit for bit.
Only what the sequence can still attend is kept (sink, attention window, bank, text K/V): about
4.4 GiB per rank in bf16 at the released sizes (README, "Stage 2").
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from memflow.vae import VAE_STRIDE
from utils.distributed import is_distributed
from utils.media import read_image

from .checkpoint_load import Resumed
from .long_sequence import LongSequence, vae_first_frame_encoder
from .loop import DistillationTrainer, _Record
from .losses_stage2 import critic_window_loss, generator_window_loss

log = logging.getLogger(__name__)


class Stage2Trainer(DistillationTrainer):
    """Stage 1's trainer with streaming windows of long sequences as its samples."""

    sequence: LongSequence | None = None
    sequences_started: int = 0

    _reencode = None

    def _first_frame_encoder(self):
        """§5.2's first-frame re-encoding with the run's VAE (`vae()`), built once."""
        if self._reencode is None:
            self._reencode = vae_first_frame_encoder(self.vae())
        return self._reencode

    # -- sequences ------------------------------------------------------------------------------
    def _new_sequence(self, prompts: list[str], switch_prompts: list[str], index: int,
                      max_length: int | None = None, switch_frame: int | None = None) -> LongSequence:
        """A sequence on (prompts, switch_prompts); its length (when the config lists several)
        and switch frame come from the run's draws for sequence `index` unless given (resume)."""
        s, cfg = self.settings, self.settings.streaming
        if max_length is None or switch_frame is None:
            draws = self.draws.sequence(index)
            if max_length is None:
                lengths = cfg.possible_max_lengths
                max_length = draws.max_length(lengths) if lengths else cfg.max_length
            if switch_frame is None:
                switch_frame = cfg.switch.draw(max_length, s.frames_per_block, draws)
        with torch.no_grad():
            cond, switch_cond = (
                self.text_encoder.encode(p).to(self.device, s.compute_dtype)
                for p in (prompts, switch_prompts)
            )
        return LongSequence(
            self.models.stepper, cfg, prompts=prompts, switch_prompts=switch_prompts, cond=cond,
            switch_cond=switch_cond, latent_hw=s.latent_hw, max_length=max_length,
            switch_frame=switch_frame, index=index, reencode=self._first_frame_encoder(),
            start=self._start_latent(index, cond),
        )

    def _start_latent(self, index: int, cond: torch.Tensor) -> torch.Tensor | None:
        """Sequence `index`'s start image (`start_images`) encoded into one latent frame, one
        per sample of the batch; None without start images."""
        path = self.settings.streaming.start_image(index)
        if path is None:
            return None
        vae = self.vae()
        height, width = (n * stride for n, stride in zip(self.settings.latent_hw, VAE_STRIDE[1:]))
        with torch.no_grad():
            latent = vae.encode(read_image(path, height, width).to(vae.device))
        return latent.expand(cond.shape[0], -1, -1, -1, -1).to(self.device,
                                                                self.settings.compute_dtype)

    def _sequence(self) -> LongSequence:
        """The current sequence, or a new one when there is none or it cannot produce another
        window (§5.1)."""
        if self.sequence is None or not self.sequence.can_generate_more():
            batch = next(self.loader)
            if batch.switch_prompts is None:
                raise RuntimeError("stage 2 needs switch prompts (switch_prompt_path)")
            self.sequence = None  # free the old caches before allocating new ones
            self.sequence = self._new_sequence(batch.prompts, batch.switch_prompts,
                                               self.sequences_started)
            self.sequences_started += 1
        return self.sequence

    # -- one micro-step -------------------------------------------------------------------------
    def _micro_step(self, micro: int, train_gen: bool, record: _Record) -> None:
        s = self.settings
        accum = s.config.gradient_accumulation_steps
        last_only = s.rollout.last_step_only
        if train_gen:
            seq = self._sequence()
            if not s.streaming.train_first_chunk and seq.generated == 0:
                with torch.no_grad():  # the first window is context only (§5.4)
                    first = seq.next_window(self._draws("generator_first", self._ids(micro)),
                                            grad=False, last_step_only=last_only)
                if record.report is not None:
                    record.report.context_windows.append(first)
                del first
                seq = self._sequence()
            uncond = self.negative.expand(seq.batch_size, -1, -1)
            g = generator_window_loss(self.models, seq, uncond, s.score,
                                      self._draws("generator", self._ids(micro)), last_only)
            (g.loss / accum).backward()
            record.generator(g)
            del g
        seq = self._sequence()
        c = critic_window_loss(self.models, seq, s.score, self._draws("critic", self._ids(micro)),
                               last_only)
        (c.loss / accum).backward()
        record.critic(c)

    def _ids(self, micro: int) -> list[int]:
        return self._sample_ids(micro, self.settings.config.batch_size)

    # -- checkpoints ----------------------------------------------------------------------------
    def _resume_state(self) -> dict[str, Any]:
        return {**super()._resume_state(), "sequences_started": self.sequences_started}

    def _rank_state(self) -> dict[str, Any] | None:
        seq = self.sequence
        return {"sequence": None if seq is None else seq.state_dict()}

    def _after_load(self, loaded: Resumed, exact: bool) -> None:
        super()._after_load(loaded, exact)
        if not exact:
            return
        self.sequences_started = int(loaded.resume_state.get("sequences_started", 0))
        state = loaded.rank_state  # read (and checked on every rank) by load_checkpoint
        # every rank must continue its sequence, or none does: ranks run windows in lockstep
        everyone = torch.tensor([0 if state is None else 1])
        if is_distributed():
            everyone = everyone.to(self.device)
            dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
        if not int(everyone.item()):
            if self.sequences_started and self.rank == 0:
                log.warning("%s holds no sequence state for every rank (another number of "
                            "processes?); new sequences start", loaded.path.parent)
            return
        saved = state.get("sequence")
        if saved is not None:
            seq = self._new_sequence(saved["prompts"], saved["switch_prompts"], saved["index"],
                                     saved["max_length"], saved["switch_frame"])
            seq.load_state_dict(saved)
            self.sequence = seq
