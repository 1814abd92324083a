"""Sample videos during training (every `vis_interval` iterations, TRAINING.md §8.3).

Every rank generates its fixed visualisation prompts with the live generator through the same
chunk stepper as inference (all ranks take part: the generator may be FSDP-sharded), decodes
them chunk by chunk with the streaming VAE decoder and writes
`<logdir>/vis/step_{s:07d}/step_{s:07d}_rank_{r}_sample_{i}_len_{frames}[_lora][_switch_frame_{p}].mp4`
(the reference's layout: the vis folder is a sibling of the run folder). Nothing here carries
gradients; the noise is seeded by step and rank, so a resumed run draws the same videos.

Stage 2 samples prompt A switching to B at a frame drawn with the training switch rule, through
the recache of interactive inference (the reference's two-prompt visualisation cannot run and
its failure is swallowed, so it never writes a video, TRAINING.md §8.3 / §10 item 28).

A run killed while it writes a step's videos resumes from that step's checkpoint without
passing that step again: `Visualiser.complete` tells the loop to write them again (the stale
`.partial.mp4` of this rank and step is removed first).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from memflow.chunk_loop import ChunkHooks, ChunkStepper
from memflow.config import SwitchOptions
from memflow.noise import SeededNoise
from memflow.text_encoder import TextEncoder
from memflow.vae import WAN_VAE_CHECKPOINT, WanVAE
from utils.video_writer import Mp4Writer

from .config import TrainSettings
from .draws import stable_seed


def build_vae(settings: TrainSettings, device: torch.device) -> WanVAE:
    """The tiny random VAE for `preset: tiny`, else the Wan2.1 VAE of the generator's folder."""
    if settings.tiny is not None:
        from memflow.tiny import build_tiny_vae

        vae = build_tiny_vae(seed=settings.tiny.seed, dtype=settings.vae_dtype)
    else:
        folder = settings.wan_models_root / settings.config.generator_name
        vae = WanVAE.from_wan_checkpoint(folder / WAN_VAE_CHECKPOINT, dtype=settings.vae_dtype)
    return vae.to(device)


@dataclass(frozen=True)
class _Sample:
    """One video of a step: prompt `index`, `frames` long, switching at `switch_frame`."""

    index: int
    frames: int
    switch_frame: int | None
    path: Path


@dataclass
class Visualiser:
    """Writes each rank's sample videos of a step into `out_dir` (<logdir>/vis)."""

    stepper: ChunkStepper
    text_encoder: TextEncoder
    vae: WanVAE
    prompts: list[str]
    settings: TrainSettings
    rank: int
    out_dir: Path
    switch_prompts: list[str] | None = None

    def folder(self, step: int) -> Path:
        return self.out_dir / f"step_{step:07d}"

    def samples(self, step: int) -> list[_Sample]:
        """The videos of `step`, in writing order, with their switch frames and file names."""
        s = self.settings
        lora = "_lora" if s.lora is not None else ""
        out = []
        for i in range(len(self.prompts)):
            for frames in s.config.vis_video_lengths:
                switch_frame = None
                if self.switch_prompts is not None:
                    found = s.streaming.switch.candidates(frames, self.stepper.frames_per_block)
                    if found:
                        switch_frame = random.Random(stable_seed(s.seed, "vis", step)).choice(found)
                name = f"step_{step:07d}_rank_{self.rank}_sample_{i}_len_{frames}{lora}"
                if switch_frame is not None:
                    name += f"_switch_frame_{switch_frame}"
                out.append(_Sample(i, frames, switch_frame, self.folder(step) / f"{name}.mp4"))
        return out

    def complete(self, step: int) -> bool:
        """Whether every video of `step` of this rank is on disk (finished: Mp4Writer renames a
        video to its name only once it is complete)."""
        return all(sample.path.is_file() for sample in self.samples(step))

    @torch.no_grad()
    def write(self, step: int) -> list[Path]:
        """One video per prompt and per length in `vis_video_lengths` (switching to
        `switch_prompts[i]` when given); returns the files written. Collective (every rank
        writes its own)."""
        s, stepper = self.settings, self.stepper
        device = stepper.generator.device
        folder = self.folder(step)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".step_{step:07d}_rank_{self.rank}_*.partial.mp4"):
            stale.unlink(missing_ok=True)  # a killed run's unfinished video of this rank and step
        switch = SwitchOptions.compat() if s.compat else SwitchOptions()
        written = []
        for sample in self.samples(step):
            context = self._encode(self.prompts[sample.index])
            switch_context = None
            if self.switch_prompts is not None:
                switch_context = self._encode(self.switch_prompts[sample.index])
            noise = SeededNoise(s.seed + 1000 * step + self.rank, dtype=stepper.dtype, device=device)
            switches = {}
            if sample.switch_frame is not None:  # A, then B from the switch on (recache)
                switches[sample.switch_frame // stepper.frames_per_block] = switch_context
            decoder = self.vae.stream()
            with Mp4Writer(sample.path, fps=16) as writer:
                hooks = ChunkHooks(before_chunk=stepper.prompt_switches(switches),
                                   on_chunk=lambda n, x0: writer.write(decoder.decode(x0[:1])[0]))
                stepper.rollout(context, sample.frames, s.latent_hw, noise, hooks=hooks,
                                switch=switch)
            written.append(sample.path)
        return written

    def _encode(self, prompt: str) -> torch.Tensor:
        return self.text_encoder.encode([prompt]).to(self.stepper.generator.device, self.stepper.dtype)
