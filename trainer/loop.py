"""The stage-1 training loop: Self-Forcing DMD with a critic (TRAINING.md §2.5, §3.1, §8).

Per iteration s (read before its increment):
  * the generator trains when s % dfake_gen_update_ratio == 0;
  * for each of `gradient_accumulation_steps` micro-steps: the next prompt batch; a generator
    rollout with gradient + DMD loss (when the generator trains); an independent no-grad rollout
    + critic flow loss; each loss divided by the number of micro-steps is back-propagated;
  * clip (pre-clip norms are logged) and step the optimisers; EMA after a generator step;
  * s += 1; EMA creation at ema_start_step; checkpoint every `log_iters` and at the end; log.
The run ends at step max_iters (`final_step`; compat: max_iters + 1, TRAINING.md §10 item 25).

Randomness: every draw comes from one injectable `RunDraws` (trainer/draws.py). The default,
`SeededRunDraws`, gives iteration s `SampleDraws(seed, s, role, sample ids)`; the global sample
index of batch row b of micro-step m on rank r is (m * world + r) * batch + b. So a sample's
noise and timesteps do not depend on how samples are split over ranks, micro-steps and batch
rows, exit steps and block counts are the same on every rank without a broadcast, and an exact
resume needs only the step and the data position. `InjectedRunDraws` replays recorded draws.

The networks (text encoder and VAE included) can be given as a `TrainModels`, and an opt-in
`report_hook` sees each iteration's losses, their inputs and the gradients before clipping
(trainer/report.py).
"""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from memflow.chunk_loop import ChunkStepper
from memflow.errors import InputError
from memflow.fsdp import shard_model
from memflow.lora import add_lora
from utils.distributed import current_rank, current_world_size, is_distributed, on_main
from utils.signals import check_terminated

from .checkpoint_files import RunModules, remove_leftovers, rotate_checkpoints
from .checkpoint_load import Resumed, load_checkpoint, load_checkpoint_file
from .checkpoint_save import save_checkpoint
from .config import OptimSettings, TrainSettings
from .data import PromptDataset, PromptLoader, build_prompt_loader, validation_batch
from .draws import RunDraws, SeededRunDraws, TrainingDraws, stable_seed
from .ema import EMA, ema_after_iteration, ema_after_resume
from .log import TrainLogger
from .losses_stage1 import DistillationModels, critic_loss, generator_loss
from .models import TrainModels, build_train_models
from .report import IterationReport, ReportHook, gradients

log = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    generator_loss: float | None
    generator_grad_norm: float | None
    dmdtrain_gradient_norm: float | None
    critic_loss: float
    critic_grad_norm: float
    dmd_timestep: float | None
    critic_timestep: float


def _adamw(params, optim: OptimSettings) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad], lr=optim.lr,
        betas=(float(optim.betas[0]), float(optim.betas[1])), eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (across shards) and return the pre-clip norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def _prepare_logdir(logdir: Path) -> None:
    """Create the run folder (rank 0) before any model is built, so that an unusable --logdir
    (e.g. a path under a regular file) is one `error:` line on every rank, not a traceback; and
    remove the half-written or half-deleted checkpoint folders a killed run left there."""

    def make() -> None:
        try:
            logdir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot write to logdir {logdir}: {err.strerror or err}") from None
        if not os.access(logdir, os.W_OK | os.X_OK):
            raise InputError(f"cannot write to logdir {logdir}: permission denied")
        for leftover in remove_leftovers(logdir):
            log.info("removed %s (left by a run killed while writing or deleting a checkpoint)",
                     leftover)

    on_main(make)


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class _Record:
    """What the micro-steps of one iteration log (host floats), and the loss objects themselves
    when a report hook wants them (`report`)."""

    gen_losses: list[float] = field(default_factory=list)
    dmd_norms: list[float] = field(default_factory=list)
    dmd_ts: list[float] = field(default_factory=list)
    critic_losses: list[float] = field(default_factory=list)
    critic_ts: list[float] = field(default_factory=list)
    report: IterationReport | None = None

    def generator(self, g: Any) -> None:
        """A generator loss (stage 1's `GeneratorLoss` or stage 2's `WindowGeneratorLoss`)."""
        self.gen_losses.append(g.loss.item())
        self.dmd_norms.append(float(g.dmdtrain_gradient_norm))
        self.dmd_ts.append(float(g.dmd_timestep.float().mean()))
        if self.report is not None:
            self.report.generator_losses.append(g)

    def critic(self, c: Any) -> None:
        """A critic loss (`CriticStepLoss` or `WindowCriticLoss`)."""
        self.critic_losses.append(c.loss.item())
        self.critic_ts.append(float(c.critic_timestep.float().mean()))
        if self.report is not None:
            self.report.critic_losses.append(c)


class DistillationTrainer:
    """The Self-Forcing DMD trainer (generator, critic, frozen teacher): stage 1 as it is, and the
    base of stage 2's `Stage2Trainer`, which replaces the rollouts with windows of long sequences.
    Builds everything from `TrainSettings`, resumes, and runs iterations until max_iters."""

    def __init__(
        self,
        settings: TrainSettings,
        device: torch.device,
        *,
        models: TrainModels | None = None,
        draws: RunDraws | None = None,
        report_hook: ReportHook | None = None,
        config_for_logging: dict[str, Any] | None = None,
        progress: bool = True,
    ):
        """`models`: the networks (default: built from the settings); `draws`: every random
        draw of the run (default: `SeededRunDraws` of the run's seed); `report_hook`: called
        with each iteration's `IterationReport` before clipping (default: none, nothing kept)."""
        self.settings = s = settings
        self.device = device
        self.rank = current_rank()
        self.world = current_world_size()
        if s.logdir is not None:
            _prepare_logdir(Path(s.logdir))
        m = models or build_train_models(s, device)
        for model in (m.generator, m.critic, m.teacher):  # each model holds its kernel
            model.set_attention_backend(s.config.attn_backend)
            if s.config.compile:
                model.compile_blocks()
        self.text_encoder = m.text_encoder
        self._vae = m.vae
        self.draws: RunDraws = draws or SeededRunDraws(s.seed, s.compute_dtype, device)
        self.report_hook = report_hook
        self.base_step = self._prepare_models(m)
        for model in (m.generator, m.critic, m.teacher):
            model.gradient_checkpointing = s.config.gradient_checkpointing and model is not m.teacher
            model.to(device)
            if is_distributed():
                shard_model(model, compute_dtype=s.compute_dtype if s.config.mixed_precision else None,
                            reshard_after_forward=s.reshard_after_forward)
        self.generator, self.critic, self.teacher = m.generator, m.critic, m.teacher
        stepper = ChunkStepper(self.generator, s.stream, s.sampling, dtype=s.compute_dtype)
        self.models = DistillationModels.build(stepper, self.teacher, self.critic, s.score)
        self.generator_opt = _adamw(self.generator.parameters(), s.generator_optim)
        self.critic_opt = _adamw(self.critic.parameters(), s.critic_optim)
        self.ema: EMA | None = EMA(self.generator, s.ema_weight) if s.ema_weight else None
        self.loader: PromptLoader = build_prompt_loader(s, self.rank, self.world)
        self.vis = self._visualiser(stepper)
        self.step = 0
        self._resume()
        with torch.no_grad():
            self.negative = self.text_encoder.encode([s.config.negative_prompt]).to(device, s.compute_dtype)
        self.logger = TrainLogger(
            None if s.config.no_save and s.logdir is None else s.logdir, rank=self.rank,
            final_step=self.final_step, start_step=self.step, wandb=s.wandb,
            config=config_for_logging, progress=progress, device=device,
        )

    # -- start-up ---------------------------------------------------------------------------
    def _prepare_models(self, m: TrainModels) -> int:
        """LoRA mode (TRAINING.md §6.1): load the base checkpoint into the plain models, then add
        the adapters (before placement and sharding). Returns the step the run starts from when
        nothing is resumed: the base's "step" in compat mode (§10 item 14), else 0."""
        s = self.settings
        if s.lora is None:
            return 0
        step = 0
        if s.generator_ckpt is not None:
            base = load_checkpoint_file(s.generator_ckpt, RunModules(m.generator, m.critic))
            step = base.step if s.inherit_base_step else 0
            if self.rank == 0:
                log.info("base weights from %s", base.path)
        # peft draws lora_A from the global RNG: seed it from the run, so that every rank
        # holds the same initial adapter before sharding and a run is reproducible
        for role, model in (("generator", m.generator), ("critic", m.critic)):
            if role == "critic" and not s.lora_on_critic:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stable_seed(s.seed, "lora", role))
                add_lora(model, s.lora)
        return step

    def _resume(self) -> None:
        """Auto-resume from logdir's newest checkpoint, else start from generator_ckpt (§8.4) or,
        with LoRA, from lora_ckpt (§6.1)."""
        s = self.settings
        modules = self.run_modules()
        resumed = None
        self.step = self.base_step
        if s.config.auto_resume and s.logdir is not None:
            resumed = load_checkpoint(s.logdir, modules)
        self._check_resumed_vis = resumed is not None
        if resumed is None:
            start = s.generator_ckpt if s.lora is None else s.lora_ckpt
            if start is not None:
                if s.lora is not None:  # a lora.pt carries no optimiser state
                    modules = modules.without_optimizers()
                started = load_checkpoint_file(start, modules, trust=s.config.trust_checkpoints)
                # a stage-1 run continues its generator_ckpt's count; stage 2 starts at 0
                # unless compat (the reference inherits the base's step, §10 item 14)
                inherit = (s.stage == 1 and s.lora is None) or s.inherit_base_step
                self.step = started.step if inherit else 0
                self._after_load(started, exact=False)
        else:
            self.step = resumed.step
            self._after_load(resumed, exact=True)
        self.ema = ema_after_resume(self.ema, self.step, s.config.ema_start_step)

    def _after_load(self, loaded: Resumed, exact: bool) -> None:
        """Restore what came with the weights (EMA start, data position); `exact`: an
        auto-resume of this run (stage 2 also restores its sequences then)."""
        s = self.settings
        if self.ema is not None and not loaded.ema_loaded:
            self.ema = EMA(self.generator, s.ema_weight)  # start from the loaded weights
        data = loaded.resume_state.get("data")
        if data is not None:
            self.loader.load_state_dict(data)
        if self.rank == 0:
            log.info("resumed from %s at step %d", loaded.path, self.step)

    def vae(self):
        """The VAE (visualisation, stage 2's first-frame re-encoding): the one given with the
        models, else built from the settings on first use."""
        if self._vae is None:
            from .visualize import build_vae

            self._vae = build_vae(self.settings, self.device)
        return self._vae

    def _visualiser(self, stepper: ChunkStepper):
        """Sample videos every `vis_interval` steps into <logdir>/vis (the reference writes
        <logdir>/../vis, §8.3, which every run under one folder would share and overwrite): a
        `trainer.visualize.Visualiser`, or None."""
        s = self.settings
        if not s.config.vis_interval or not s.config.vis_video_lengths or s.logdir is None:
            return None
        from .visualize import Visualiser

        switch_path = s.val_switch_prompt_path if s.stage == 2 else None
        dataset = PromptDataset.from_file(s.val_data_path, switch_path)
        batch = validation_batch(dataset, s.config.val_batch_size, self.rank, self.world)
        out_dir = Path(s.logdir).resolve() / "vis"
        return Visualiser(stepper, self.text_encoder, self.vae(), batch.prompts, s, self.rank,
                          out_dir, batch.switch_prompts)

    def _finish_resumed_vis(self) -> None:
        """A run killed while writing the videos of the step it resumes from never passes that
        step again: write them now, on every rank when any rank's are incomplete."""
        s = self.settings
        if self.vis is None or self.step == 0 or self.step % s.config.vis_interval:
            return
        missing = torch.tensor([0 if self.vis.complete(self.step) else 1])
        if is_distributed():
            missing = missing.to(self.device)
            dist.all_reduce(missing, op=dist.ReduceOp.MAX)
        if int(missing.item()):
            if self.rank == 0:
                log.info("writing the unfinished sample videos of step %d", self.step)
            self.vis.write(self.step)

    # -- one iteration ----------------------------------------------------------------------
    def _sample_ids(self, micro: int, batch: int) -> list[int]:
        first = (micro * self.world + self.rank) * self.settings.config.batch_size
        return list(range(first, first + batch))

    def _draws(self, role: str, ids: list[int]) -> TrainingDraws:
        return self.draws.rollout(self.step, role, ids)

    def _micro_step(self, micro: int, train_gen: bool, record: "_Record") -> None:
        """One micro-step (§3.1): a generator rollout + DMD loss (when the generator trains) and an
        independent no-grad rollout + critic loss, each back-propagated / accumulation steps."""
        s = self.settings
        accum = s.config.gradient_accumulation_steps
        batch = next(self.loader)
        with torch.no_grad():
            cond = self.text_encoder.encode(batch.prompts).to(self.device, s.compute_dtype)
        uncond = self.negative.expand(len(batch), -1, -1)
        ids = self._sample_ids(micro, len(batch))
        if train_gen:
            g = generator_loss(self.models, cond, uncond, s.latent_hw, s.rollout, s.score,
                               self._draws("generator", ids))
            (g.loss / accum).backward()
            record.generator(g)
        c = critic_loss(self.models, cond, s.latent_hw, s.rollout, s.score,
                        self._draws("critic", ids))
        (c.loss / accum).backward()
        record.critic(c)

    def train_step(self) -> StepMetrics:
        """One iteration (§2.5): micro-steps, clipping, optimiser steps, EMA; then s += 1."""
        s = self.settings
        train_gen = s.train_generator(self.step)
        if train_gen:
            self.generator_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        record = _Record()
        if self.report_hook is not None:
            record.report = IterationReport(self.step, train_gen)
        for micro in range(s.config.gradient_accumulation_steps):
            self._micro_step(micro, train_gen, record)
        if record.report is not None:
            record.report.critic_grads = gradients(self.critic)
            if train_gen:
                record.report.generator_grads = gradients(self.generator)
            self.report_hook(record.report)
        gen_norm = None
        if train_gen:
            gen_norm = _clip(self.generator, s.generator_optim.max_grad_norm)
            self.generator_opt.step()
            if self.ema is not None:
                self.ema.update(self.generator)
        critic_norm = _clip(self.critic, s.critic_optim.max_grad_norm)
        self.critic_opt.step()
        self.step += 1
        self.ema = ema_after_iteration(self.ema, self.generator, self.step, s.config.ema_start_step,
                                       s.ema_weight or 0.0, enabled=s.ema_weight is not None)
        return StepMetrics(
            generator_loss=_mean(record.gen_losses), generator_grad_norm=gen_norm,
            dmdtrain_gradient_norm=_mean(record.dmd_norms),
            critic_loss=_mean_over_ranks(_mean(record.critic_losses), self.device),
            critic_grad_norm=critic_norm, dmd_timestep=_mean(record.dmd_ts),
            critic_timestep=_mean(record.critic_ts),
        )

    # -- the loop ---------------------------------------------------------------------------
    def save(self) -> None:
        s = self.settings
        save_checkpoint(s.logdir, self.step, self.run_modules(),
                        resume_state=self._resume_state(), rank_state=self._rank_state())
        if self.rank == 0 and s.config.max_checkpoints > 0:
            rotate_checkpoints(s.logdir, s.config.max_checkpoints)

    def run_modules(self) -> RunModules:
        """The modules a checkpoint saves and restores."""
        return RunModules(self.generator, self.critic, self.generator_opt, self.critic_opt,
                          self.ema)

    def _resume_state(self) -> dict[str, Any]:
        """The loop's own state for resume.pt (rank 0's)."""
        return {"data": self.loader.state_dict(), "seed": self.settings.seed}

    def _rank_state(self) -> dict[str, Any] | None:
        """Each rank's own state for rank_{r}.pt (None: nothing per rank)."""
        return None

    @property
    def final_step(self) -> int:
        """The step the run ends at: max_iters iterations from step 0 in clean; max_iters + 1 in
        compat, whose loop runs while s <= max_iters (TRAINING.md §10 item 25)."""
        return self.settings.config.max_iters + (1 if self.settings.compat else 0)

    def run(self, stop_after: int | None = None, on_step: Callable[[int], None] | None = None) -> None:
        """Iterate until `final_step` (or `stop_after` more iterations). The final step is
        saved too, whatever `log_iters`, so a rerun of a finished run has nothing to redo."""
        s = self.settings
        start = self.step
        try:
            if self._check_resumed_vis:
                self._check_resumed_vis = False
                self._finish_resumed_vis()
            while self.step < self.final_step and (stop_after is None or self.step - start < stop_after):
                check_terminated()
                metrics = self.train_step()
                check_terminated()  # never save after an interrupted step
                due = self.step % s.config.log_iters == 0 or self.step == self.final_step
                if not s.config.no_save and s.logdir is not None and due:
                    self.save()
                self.logger.log_step(
                    self.step, **metrics.__dict__,
                    lr=s.generator_optim.lr, lr_critic=s.critic_optim.lr,
                )
                if self.vis is not None and self.step % s.config.vis_interval == 0:
                    self.vis.write(self.step)
                if s.config.gc_interval and self.step % s.config.gc_interval == 0:
                    gc.collect()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                if on_step is not None:
                    on_step(self.step)
        finally:
            self.logger.close()
