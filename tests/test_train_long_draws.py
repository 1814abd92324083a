"""Stage 2 driven by recorded draws through the public API (issue 15, item 2).

The trainer takes every random draw from one `RunDraws` (here `InjectedRunDraws` of recorded
window draws and sequence set-ups), its networks, text encoder and VAE from a `TrainModels`, and
reports each iteration (windows with their schedule, losses, DMD gradient, critic flow and its
target, gradients before clipping) to an opt-in hook. The scenario is configs/tiny_train_long.yaml:
one 18-frame sequence, windows [0,6) [6,9) [9,12) [12,15) [15,18), switch at 12, exit steps
0, 3, 1, 2, 0; three iterations (generator at 0 and 2) consume exactly those five windows.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CPU, train_settings
from memflow.noise import NoiseSource
from trainer.draws import (InjectedDraws, InjectedRunDraws, InjectedSequence, SeededRunDraws,
                           SequenceDraws, TrainingDraws, stable_seed)
from trainer.models import build_train_models
from trainer.report import IterationReport
from trainer.long_sequence import window_schedule

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_train_long.yaml"
SWITCH = 12
EXITS = [0, 3, 1, 2, 0]
# (iteration, role) of the five windows: a generator iteration takes two, a critic-only one
ROLES = [(0, "generator"), (0, "critic"), (1, "critic"), (2, "generator"), (2, "critic")]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_settings(**overrides: Any):
    return train_settings(CONFIG, None, vis_interval=0, **overrides)


# ------------------------------------------------------------------------------------------------
# Recorded draws and what a run reports
# ------------------------------------------------------------------------------------------------
def recorded_windows(settings, exits: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """Random draws for each window of the sequence, by role, in `InjectedDraws`' layout."""
    g = torch.Generator().manual_seed(seed)
    fpb, window = settings.frames_per_block, settings.streaming.window_frames
    block = (settings.config.batch_size * fpb, 16, *settings.latent_hw)
    schedule = window_schedule(settings.streaming.max_length, settings.streaming, fpb)
    out = []
    for (_, n_new), k in zip(schedule, exits):
        blocks = n_new // fpb
        out.append(dict(
            blocks=blocks, exit=k,
            initial=torch.randn(settings.config.batch_size, n_new, *block[1:], generator=g),
            step=torch.randn(blocks, k, *block, generator=g),  # exit step 0: no step noise
            context=torch.randn(blocks, *block, generator=g),
            t=torch.randint(100, 900, (settings.config.batch_size, 1), generator=g),
            score=torch.randn(settings.config.batch_size, window, *block[1:], generator=g),
        ))
    return out


def injected(windows: list[dict[str, Any]], switch: int = SWITCH) -> InjectedRunDraws:
    return InjectedRunDraws(
        [InjectedDraws(w["blocks"], w["initial"], w["step"], w["context"], w["exit"], w["t"],
                       w["score"]) for w in windows],
        [InjectedSequence(switch)],
    )


def snapshot(report: IterationReport) -> dict[str, Any]:
    """Copies of everything a report holds (its gradients are scaled by clipping afterwards)."""

    def window(loss: Any, role: str) -> dict[str, Any]:
        if not hasattr(loss, "window"):  # stage 1: a rollout
            r = loss.rollout
            return dict(role=role, exit=r.exit_steps, latents=r.latents.detach().clone(),
                        loss=loss.loss.detach().clone())
        w = loss.window
        return dict(role=role, start=w.start_frame, new=w.new_frames, exit=w.exit_step,
                    switched_here=w.switched_here, uses_b=w.uses_switch_prompt,
                    mask=None if w.gradient_mask is None else w.gradient_mask.clone(),
                    latents=w.latents.detach().clone(), loss=loss.loss.detach().clone())

    windows = []
    for g in report.generator_losses:
        windows.append({**window(g, "generator"), "dmd_grad": g.dmd_grad.clone(),
                        "timestep": g.dmd_timestep.clone()})
    for c in report.critic_losses:
        windows.append({**window(c, "critic"), "flow": c.critic_flow.detach().clone(),
                        "target": c.flow_target.clone(), "timestep": c.critic_timestep.clone()})
    grads = {f"generator.{k}": v.clone() for k, v in report.generator_grads.items()}
    grads.update({f"critic.{k}": v.clone() for k, v in report.critic_grads.items()})
    return dict(step=report.step, windows=windows, grads=grads)


def run(draws=None, iterations: int = 3, models=None, settings=None, stage: int = 2):
    """A tiny trainer driven by `draws` (None: its default) for `iterations` steps."""
    from trainer.long_tuning import Stage2Trainer
    from trainer.loop import DistillationTrainer

    reports: list[dict[str, Any]] = []
    trainer = (Stage2Trainer if stage == 2 else DistillationTrainer)(
        settings or make_settings(), CPU, models=models, draws=draws,
        report_hook=lambda r: reports.append(snapshot(r)), progress=False)
    metrics = [trainer.train_step().__dict__ for _ in range(iterations)]
    weights = {f"{role}.{k}": v.detach().clone() for role, m in
               (("generator", trainer.generator), ("critic", trainer.critic))
               for k, v in m.named_parameters()}
    return dict(trainer=trainer, reports=reports, metrics=metrics, weights=weights)


def assert_bitwise(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def replayed():
    torch.set_num_threads(1)
    windows = recorded_windows(make_settings(), EXITS)
    runs = []
    for _ in range(2):
        draws = injected(windows)
        out = run(draws)
        out["draws"] = draws
        runs.append(out)
    return windows, runs


# ------------------------------------------------------------------------------------------------
# Replays
# ------------------------------------------------------------------------------------------------
def test_a_replay_runs_the_recorded_schedule(replayed):
    _, (first, _) = replayed
    draws = first["draws"]
    assert draws.exhausted
    assert [(step, role) for step, role, _ in draws.requests] == ROLES
    assert first["trainer"].sequence.switch_frame == SWITCH
    windows = [w for r in first["reports"] for w in r["windows"]]
    assert [(w["role"], w["start"], w["new"], w["exit"]) for w in windows] == [
        ("generator", 0, 6, 0), ("critic", 6, 3, 3), ("critic", 9, 3, 1),
        ("generator", 12, 3, 2), ("critic", 15, 3, 0)]
    assert [(w["switched_here"], w["uses_b"]) for w in windows] == [
        (False, False), (False, False), (False, False), (True, True), (False, True)]
    assert windows[0]["mask"] is None
    for w in windows[1:]:  # 3 overlap frames, 3 new ones
        assert not w["mask"][:, :3].any() and w["mask"][:, 3:].all()
    assert [r["step"] for r in first["reports"]] == [0, 1, 2]
    assert first["reports"][1]["grads"].keys() == {
        k for k in first["reports"][0]["grads"] if k.startswith("critic.")}  # critic-only step


def test_replaying_the_same_draws_twice_is_bitwise_equal(replayed):
    """Frames, losses, DMD gradients, critic flows and targets, pre-clipping gradients, logged
    metrics and the final weights of two replays agree bit for bit."""
    _, (a, b) = replayed
    assert_bitwise(a["reports"], b["reports"], "reports")
    assert_bitwise(a["metrics"], b["metrics"], "metrics")
    assert_bitwise(a["weights"], b["weights"], "weights")
    assert any(g.abs().max() > 0 for g in a["reports"][0]["grads"].values())


def test_the_injected_draws_drive_the_run(replayed):
    """Another exit step for the third window (iteration 1) leaves iteration 0 bitwise as it
    was and changes that window's frames: the run takes its draws from the injected object."""
    windows, (a, _) = replayed
    changed = list(windows)
    g = torch.Generator().manual_seed(9)
    changed[2] = {**windows[2], "exit": 2,
                  "step": torch.randn(1, 2, *windows[2]["context"].shape[1:], generator=g)}
    b = run(injected(changed), iterations=2)
    assert_bitwise(a["reports"][0], b["reports"][0], "iteration 0")
    before, after = a["reports"][1]["windows"][0], b["reports"][1]["windows"][0]
    assert (before["exit"], after["exit"]) == (1, 2)
    assert not torch.equal(before["latents"][:, 3:], after["latents"][:, 3:])


# ------------------------------------------------------------------------------------------------
# The default draws are the same protocol: recorded, they replay the default run
# ------------------------------------------------------------------------------------------------
class RecordingNoise(NoiseSource):
    """Records a rollout's noise by chunk and step (stage 2: by block of the window, as
    `WindowNoise` asks)."""

    def __init__(self, inner):
        self.inner = inner
        self.initial_noise = None
        self.steps: dict[tuple[int, int], torch.Tensor] = {}
        self.contexts: dict[int, torch.Tensor] = {}

    def initial(self, shape):
        self.initial_noise = self.inner.initial(shape).clone()
        return self.initial_noise

    def step(self, chunk, step, shape):
        self.steps[chunk, step] = self.inner.step(chunk, step, shape).clone()
        return self.steps[chunk, step]

    def context(self, chunk, shape):
        self.contexts[chunk] = self.inner.context(chunk, shape).clone()
        return self.contexts[chunk]


class RecordingDraws:
    """A `TrainingDraws` that keeps every value the wrapped one hands out."""

    def __init__(self, inner: TrainingDraws):
        self.inner = inner
        self.values: dict[str, Any] = {}

    def num_blocks(self, low, high):
        self.values["num_blocks"] = self.inner.num_blocks(low, high)
        return self.values["num_blocks"]

    def rollout_noise(self):
        self.values["noise"] = RecordingNoise(self.inner.rollout_noise())
        return self.values["noise"]

    def exit_steps(self, num_blocks, num_steps):
        self.values["exit_steps"] = self.inner.exit_steps(num_blocks, num_steps)
        return self.values["exit_steps"]

    def score_timestep(self, low, high, batch_size):
        self.values["t"] = self.inner.score_timestep(low, high, batch_size)
        return self.values["t"]

    def score_noise(self, like):
        self.values["score"] = self.inner.score_noise(like).clone()
        return self.values["score"]

    def replay(self) -> InjectedDraws:
        v, noise = self.values, self.values["noise"]
        blocks = v["num_blocks"]
        shape = noise.contexts[0].shape
        k = 1 + max((s for _, s in noise.steps), default=-1)
        if k:
            step = torch.stack([torch.stack([noise.steps[j, i] for i in range(k)])
                                for j in range(blocks)])
        else:
            step = torch.empty(blocks, 0, *shape)
        context = torch.stack([noise.contexts[j] for j in range(blocks)])
        return InjectedDraws(blocks, noise.initial_noise, step, context, v["exit_steps"], v["t"],
                             v["score"])


class RecordingSequence:
    def __init__(self, inner: SequenceDraws):
        self.inner = inner
        self.length: int | None = None
        self.switch: int | None = None

    def max_length(self, choices):
        self.length = self.inner.max_length(choices)
        return self.length

    def switch_frame(self, candidates):
        self.switch = self.inner.switch_frame(candidates)
        return self.switch


class RecordingRunDraws:
    def __init__(self, inner: SeededRunDraws):
        self.inner = inner
        self.rollouts: list[RecordingDraws] = []
        self.sequences: list[RecordingSequence] = []

    def rollout(self, step, role, sample_ids):
        self.rollouts.append(RecordingDraws(self.inner.rollout(step, role, sample_ids)))
        return self.rollouts[-1]

    def sequence(self, index):
        assert index == len(self.sequences)
        self.sequences.append(RecordingSequence(self.inner.sequence(index)))
        return self.sequences[-1]

    def replay(self) -> InjectedRunDraws:
        return InjectedRunDraws([r.replay() for r in self.rollouts],
                                [InjectedSequence(s.switch, s.length) for s in self.sequences])


def test_the_default_draws_recorded_and_replayed_give_the_default_run_bitwise():
    """Four iterations (six windows: a second sequence starts at iteration 3) with the
    trainer's default, with `SeededRunDraws` of the run's seed recorded, and with the recording
    replayed through `InjectedRunDraws`: three bitwise-equal runs."""
    settings = make_settings()
    default = run(settings=settings, iterations=4)
    recording = RecordingRunDraws(SeededRunDraws(settings.seed, settings.compute_dtype, CPU))
    recorded = run(recording, iterations=4, settings=settings)
    assert len(recording.rollouts) == 6 and len(recording.sequences) == 2
    replayed = run(recording.replay(), iterations=4, settings=settings)
    assert recorded["trainer"].sequence.index == replayed["trainer"].sequence.index == 1
    for other in (recorded, replayed):
        assert_bitwise(default["reports"], other["reports"], "reports")
        assert_bitwise(default["metrics"], other["metrics"], "metrics")
        assert_bitwise(default["weights"], other["weights"], "weights")


def test_stage1_takes_its_draws_and_reports_through_the_same_api():
    """Stage 1 (configs/tiny_train_init.yaml, a generator iteration then a critic-only one):
    the default run, the recorded `SeededRunDraws` and their replay are bitwise equal, and the
    report's critic flow target is the recorded score noise minus the rollout."""
    settings = train_settings(REPO / "configs" / "tiny_train_init.yaml", None, vis_interval=0)
    default = run(settings=settings, iterations=2, stage=1)
    recording = RecordingRunDraws(SeededRunDraws(settings.seed, settings.compute_dtype, CPU))
    recorded = run(recording, iterations=2, settings=settings, stage=1)
    replay = recording.replay()
    replayed = run(replay, iterations=2, settings=settings, stage=1)
    assert [(step, role) for step, role, _ in replay.requests] == [
        (0, "generator"), (0, "critic"), (1, "critic")]
    for other in (recorded, replayed):
        assert_bitwise(default["reports"], other["reports"], "reports")
        assert_bitwise(default["metrics"], other["metrics"], "metrics")
        assert_bitwise(default["weights"], other["weights"], "weights")
    critic = default["reports"][1]["windows"][0]
    assert critic["role"] == "critic"
    noise = recording.rollouts[2].values["score"]
    assert torch.equal(critic["target"], noise - critic["latents"])
    assert default["reports"][1]["grads"] and all(
        k.startswith("critic.") for k in default["reports"][1]["grads"])


def test_injected_draws_that_do_not_fit_the_run_fail_loudly():
    windows = recorded_windows(make_settings(), EXITS)
    with pytest.raises(ValueError, match=r"switch frame 7 is not one of the candidates \[6, 9, 12"):
        run(injected(windows, switch=7), iterations=1)
    with pytest.raises(ValueError, match=r"hold 2 rollouts; step 1 asks for another \(critic\)"):
        run(injected(windows[:2]), iterations=2)


# ------------------------------------------------------------------------------------------------
# An exit-step-0 window by hand
# ------------------------------------------------------------------------------------------------
def _x0(model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor):
    """x0 = x_t - σ·v of a bidirectional call on [B, F, C, h, w] (t: [B, F])."""
    v = model(x.permute(0, 2, 1, 3, 4), t, cond).permute(0, 2, 1, 3, 4)
    return x - sigma * v, v


def test_an_exit_step_0_window_by_hand():
    """Window [0, 6) exits at step 0: its first chunk is x0 of one generator call on the
    injected noise at the first timestep (no step noise is injected: a second call would fail);
    its DMD gradient is (critic x0 - CFG teacher x0) / mean|x - teacher x0| at the injected
    score timestep, shifted, and the injected noise; the critic window's flow target is
    injected noise minus its frames. Checked in the hook, before the optimiser step."""
    settings = make_settings()
    assert settings.score.score_shift is None  # clean: one sigma table everywhere
    windows = recorded_windows(settings, EXITS)
    checked = []

    def check(report: IterationReport) -> None:
        if report.step != 0:
            return
        g, c = report.generator_losses[0], report.critic_losses[0]
        w = g.window
        scheduler = trainer.models.stepper.scheduler
        with torch.no_grad():
            noise = windows[0]["initial"]
            t0 = trainer.models.stepper.timesteps[0]
            sigma0 = scheduler.sigma(t0.reshape(1)).double().item()
            block0, _ = _x0(trainer.generator, noise[:, :3], torch.full((1, 3), float(t0)),
                            w.cond, sigma0)
            torch.testing.assert_close(w.latents[:, :3], block0, rtol=1e-5, atol=1e-5)

            u = windows[0]["t"].double().item() / 1000
            shift = settings.score.timestep_shift
            t_score = min(max(shift * u / (1 + (shift - 1) * u) * 1000, 20.0), 980.0)
            assert g.dmd_timestep.shape == (1, 6)
            assert g.dmd_timestep.double() == pytest.approx(torch.full((1, 6), t_score), rel=1e-6)
            t = g.dmd_timestep
            sigma = scheduler.sigma(t[0, :1]).item()
            x = w.latents.detach()
            x_t = (1 - sigma) * x + sigma * windows[0]["score"]
            fake, _ = _x0(trainer.critic, x_t, t, w.cond, sigma)
            uncond = trainer.negative
            rc, _ = _x0(trainer.teacher, x_t, t, w.cond, sigma)
            ru, _ = _x0(trainer.teacher, x_t, t, uncond, sigma)
            real = rc + settings.score.guidance_scale * (rc - ru)
            expected = (fake - real) / (x - real).abs().mean()
            torch.testing.assert_close(g.dmd_grad, expected, rtol=1e-4, atol=1e-6)
            assert g.loss.item() == pytest.approx(0.5 * expected.double().pow(2).mean().item(),
                                                  rel=1e-4)

            x = c.window.latents
            assert torch.equal(c.flow_target, windows[1]["score"] - x)
            t = c.critic_timestep
            sigma = scheduler.sigma(t[0, :1]).item()
            _, v = _x0(trainer.critic, (1 - sigma) * x + sigma * windows[1]["score"], t,
                       c.window.cond, sigma)
            torch.testing.assert_close(c.critic_flow, v, rtol=1e-4, atol=1e-5)
            mask = c.window.gradient_mask
            err = (c.critic_flow - c.flow_target)[mask].pow(2).mean()
            assert c.loss.item() == pytest.approx(err.item(), rel=1e-6)
        checked.append(report.step)

    from trainer.long_tuning import Stage2Trainer

    trainer = Stage2Trainer(settings, CPU, draws=injected(windows), report_hook=check,
                            progress=False)
    trainer.train_step()
    assert checked == [0]


# ------------------------------------------------------------------------------------------------
# Components: text encoder and VAE given to the trainer; gradients before clipping
# ------------------------------------------------------------------------------------------------
class RecordedTextEncoder:
    """Replays fixed prompt embeddings (one random embedding per prompt text)."""

    def __init__(self, text_len: int, dim: int):
        self.text_len, self.dim = text_len, dim

    def embedding(self, prompt: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(stable_seed("prompt", prompt))
        return torch.randn(1, self.text_len, self.dim, generator=g)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.cat([self.embedding(p) for p in prompts])


class StubVAE:
    """Decodes to the latents themselves and encodes any frame to 7s; records its inputs."""

    dtype = torch.float32

    def __init__(self):
        self.decoded: list[torch.Tensor] = []

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.decoded.append(latents.clone())
        return latents

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(pixels, 7.0)


def test_text_encoder_and_vae_come_from_the_given_models_and_grads_are_pre_clipping():
    settings = make_settings(max_grad_norm_generator=1e-6, max_grad_norm_critic=1e-6)
    built = build_train_models(settings, CPU)
    text = RecordedTextEncoder(settings.tiny.text_len, built.generator.config.text_dim)
    vae = StubVAE()
    models = dataclasses.replace(built, text_encoder=text, vae=vae)
    out = run(injected(recorded_windows(settings, EXITS)), iterations=1, models=models,
              settings=settings)
    trainer = out["trainer"]
    assert trainer.vae() is vae
    seq = trainer.sequence
    assert torch.equal(seq.cond, text.encode(seq.prompts))
    assert torch.equal(seq.switch_cond, text.encode(seq.switch_prompts))
    assert torch.equal(trainer.negative, text.encode([settings.config.negative_prompt]))
    generator_window, critic_window = out["reports"][0]["windows"]
    # the critic window [6, 9) re-encodes its first frame through the given VAE (§5.2)
    assert len(vae.decoded) == 1
    assert torch.equal(vae.decoded[0], generator_window["latents"][:, :4])
    assert torch.all(critic_window["latents"][:, 0] == 7.0)
    # the hook saw the gradients before clipping: their norm is the logged pre-clip norm,
    # far above the 1e-6 the parameters' gradients were clipped to
    metrics = out["metrics"][0]
    for role, norm in (("generator", metrics["generator_grad_norm"]),
                       ("critic", metrics["critic_grad_norm"])):
        grads = [g for k, g in out["reports"][0]["grads"].items() if k.startswith(role + ".")]
        assert grads and norm > 1e-3
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == \
            pytest.approx(norm, rel=1e-5)
        model = getattr(trainer, role)
        clipped = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
        assert torch.linalg.vector_norm(clipped).item() == pytest.approx(1e-6, rel=1e-3)
