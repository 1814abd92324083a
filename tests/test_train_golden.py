"""Stage-1 Self-Forcing DMD training against the reference's recorded generator step.

`../shared/golden/train_golden_stage1_gen.pt` is one call of the reference's
`DMD.generator_loss` (2-block rollout with the memory bank, then the DMD loss) followed by
`loss.backward()`, in float32 on CPU with every random draw stored (golden README, "Training
fixture"). We replay those draws by role and compare every recorded output. The tolerances are
the README's; the float noise it measured is 10-20x below them, the known mistakes (wrong exit
step, shift-5 table for the teacher/critic) far above.

The tests after the parity block need no fixture: batch > 1 (which the reference cannot run)
must equal the per-sample runs, and the critic loss must train the critic only.
"""
from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_DIT, bank_of, tiny_dit, tiny_prompt
from reference_files import load_wan_state

from config.stream import memory_preset
from memflow.checkpoint import load_generator_checkpoint
from memflow.chunk_loop import ChunkStepper
from memflow.config import MemoryOptions, SamplingConfig, StreamConfig
from memflow.model import WanDiT
from trainer.dmd import dmd_gradient, dmd_loss, score_timestep, shift_timestep
from trainer.draws import InjectedDraws, SeededDraws
from trainer.losses_stage1 import DistillationModels, critic_loss, generator_loss
from trainer.rollout import RolloutConfig
from trainer.score import ScoreConfig

LATENT_HW = (60, 104)


# ------------------------------------------------------------------------------------------------
# Parity with the recorded reference step
# ------------------------------------------------------------------------------------------------
def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _golden_draws(d: dict) -> InjectedDraws:
    """The fixture's draws by role (stored bf16, bf16-exact: cast to float32)."""
    return InjectedDraws(
        num_blocks=d["num_generated_blocks"][0],
        initial_noise=d["rollout_initial_noise"].float(),
        step_noise=d["step_noise"].float(),
        context_noise=d["context_noise"].float(),
        exit_steps=d["exit_flags"],
        score_timestep=torch.tensor(d["dmd_timestep_int"]),
        score_noise=d["dmd_noise"].float(),
    )


@pytest.fixture(scope="module")
def golden_step():
    """Build the three models from the fixture's weights, run the generator loss once and
    backpropagate (generator with activation checkpointing, as the reference computed it)."""
    from conftest import GOLDEN

    if not GOLDEN.is_dir():
        pytest.skip(f"reference golden outputs not found at {GOLDEN} (../shared/golden is absent)")
    torch.set_num_threads(1)
    fixture = torch.load(GOLDEN / "train_golden_stage1_gen.pt", map_location="cpu", weights_only=False)
    weights = torch.load(GOLDEN / "train_weights.pt", map_location="cpu", weights_only=False)
    embeds = torch.load(GOLDEN / "prompt_embeds.pt", map_location="cpu")

    generator = WanDiT(GOLDEN_DIT).eval()
    load_generator_checkpoint(generator, GOLDEN / "base.pt")
    generator.gradient_checkpointing = True
    teacher = WanDiT(GOLDEN_DIT).eval().requires_grad_(False)
    load_wan_state(teacher, weights["real_score"], "train_weights.pt['real_score']")
    critic = WanDiT(GOLDEN_DIT).eval()
    load_wan_state(critic, weights["fake_score"], "train_weights.pt['fake_score']")

    stepper = ChunkStepper(
        generator, StreamConfig(memory=memory_preset(True, "stage1")),
        SamplingConfig(denoising_step_list=(1000, 750, 500, 250), warp_denoising_step=True,
                       timestep_shift=5.0, context_noise=0.0),
    )
    score_config = ScoreConfig.compat()
    models = DistillationModels.build(stepper, teacher, critic, score_config)
    rollout_config = RolloutConfig(
        num_training_frames=fixture["num_training_frames"],
        min_num_training_frames=fixture["min_num_training_frames"],
    )
    cond = embeds["p0"].float()
    uncond = weights["negative_prompt_embeds"].float()
    out = generator_loss(models, cond, uncond, LATENT_HW, rollout_config, score_config,
                         _golden_draws(fixture["draws"]))
    out.loss.backward()
    grads = {n: p.grad for n, p in generator.named_parameters()}
    return fixture, out, grads, models, cond, uncond


def test_rollout_output(golden_step):
    fixture, out, _, _, _, _ = golden_step
    ref = fixture["outputs"]
    assert out.rollout.num_blocks == 2 and out.rollout.exit_steps == [fixture["k_star"]] * 2
    assert out.rollout.gradient_mask is None and ref["gradient_mask"] is None
    for block in range(2):
        sl = slice(3 * block, 3 * block + 3)
        err = _max_abs(out.rollout.latents[:, sl].detach(), ref["pred_image"][:, sl])
        assert err <= 1e-3, f"pred_image block {block}: max|Δ| = {err:.3e} (tol 1e-3)"
    assert out.rollout.denoised_timestep_from == ref["denoised_timestep_from"] == 750
    assert out.rollout.denoised_timestep_to == ref["denoised_timestep_to"] == 500


def test_dmd_timestep_exact(golden_step):
    fixture, out, _, _, _, _ = golden_step
    ref = fixture["outputs"]["dmd_timestep"]
    assert out.dmd_timestep.dtype == ref.dtype == torch.float32
    assert torch.equal(out.dmd_timestep, ref)


def test_dmd_gradient_and_loss(golden_step):
    fixture, out, _, _, _, _ = golden_step
    ref = fixture["outputs"]
    err = _max_abs(out.dmd_grad, ref["dmd_grad"])
    assert err <= 3e-4, f"dmd_grad: max|Δ| = {err:.3e} (tol 3e-4)"
    assert out.loss.dtype == torch.float64 and out.loss.dim() == 0
    assert out.loss.item() == pytest.approx(ref["loss"].item(), rel=1e-5, abs=0)
    norm = float(ref["dmdtrain_gradient_norm"])
    assert out.dmdtrain_gradient_norm.item() == pytest.approx(norm, rel=1e-5, abs=0)


def test_generator_gradients(golden_step):
    fixture, _, grads, _, _, _ = golden_step
    ref = fixture["outputs"]["generator_grads"]
    assert set(ref) == set(grads) and len(ref) == 69
    for name, expected in ref.items():
        got = grads[name]
        assert got is not None, f"{name}: no gradient"
        err = _max_abs(got, expected)
        assert err <= 1e-6, f"{name}: max|Δ| = {err:.3e} (tol 1e-6)"


def test_score_sigma_table_matters(golden_step):
    """On the reference's own sample and draws, the DMD gradient matches with the teacher and
    critic reading x0 through the shift-8 table (compat) and misses the tolerance with the
    generator's shift-5 table (the README's 1.2e-3): the tolerance does catch that mistake."""
    fixture, _, _, models, cond, uncond = golden_step
    ref = fixture["outputs"]
    x = ref["pred_image"].float()
    errs = {}
    for name, config in (("compat", ScoreConfig.compat()), ("clean", ScoreConfig.clean())):
        m = DistillationModels.build(models.stepper, models.teacher.model, models.critic.model, config)
        dmd = dmd_gradient(x, cond, uncond, m.teacher, m.critic, m.stepper.scheduler, config,
                           _golden_draws(fixture["draws"]))
        errs[name] = _max_abs(dmd.grad, ref["dmd_grad"])
    assert errs["compat"] <= 3e-4 < errs["clean"], errs


# ------------------------------------------------------------------------------------------------
# Without the fixture: timesteps, loss algebra, batch > 1, critic routing
# ------------------------------------------------------------------------------------------------
def test_score_timestep_shift_and_clamp():
    cfg = ScoreConfig.compat()
    t = shift_timestep(torch.tensor([[347]]), 5.0)
    assert t.dtype == torch.float32 and t.item() == 726.5493774414062
    draws = SeededDraws(torch.Generator().manual_seed(0))
    ts = score_timestep(cfg, draws, batch_size=4000, num_frames=6)
    assert ts.shape == (4000, 6) and (ts == ts[:, :1]).all()
    assert ts.min().item() >= 20 and ts.max().item() <= 980
    assert 0.07 < (ts[:, 0] == 980).float().mean().item() < 0.115  # spec: P(t = 980) = 9.2 %


def test_dmd_loss_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, 2, 2, generator=g, requires_grad=True)
    delta = torch.randn(x.shape, generator=g)
    mask = torch.ones(x.shape, dtype=torch.bool)
    mask[:, :3] = False
    loss = dmd_loss(x, delta, mask)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.5 * delta[mask].double().pow(2).mean().item(), rel=1e-12)
    loss.backward()
    expected = torch.where(mask, delta / mask.sum(), torch.zeros_like(delta))
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=0)


HW = (4, 6)


def _tiny_models(dtype: torch.dtype, config: ScoreConfig) -> DistillationModels:
    """Tiny generator / teacher / critic; a 6-frame window with a 2-slot bank recording every
    chunk, so a 4-block rollout fills the bank and compresses (text retrieval per sample)."""
    stream = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1,
                          memory=MemoryOptions.clean())
    gen = tiny_dit(seed=0).to(dtype)
    gen.gradient_checkpointing = True
    teacher = tiny_dit(seed=1).to(dtype).requires_grad_(False)
    critic = tiny_dit(seed=2).to(dtype)
    return DistillationModels.build(ChunkStepper(gen, stream, SamplingConfig()), teacher, critic, config)


# 4 blocks drawn from [3, 4]: the first block is masked out of the loss
TINY_ROLLOUT = RolloutConfig(num_training_frames=12, min_num_training_frames=9, slice_last_frames=12)


def _sample_draws(seed: int, exit_step: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = 16
    n = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(
        initial=n(1, 12, c, *HW), step=n(4, max(exit_step, 1), 3, c, *HW), context=n(4, 3, c, *HW),
        t=torch.randint(0, 1000, (1, 1), generator=g), score=n(1, 12, c, *HW),
    )


def _draws(samples: list[dict], exit_step: int) -> InjectedDraws:
    """Per-sample draws stacked into one batch (step/context noise are [chunk, step, B*F, ...])."""
    return InjectedDraws(
        num_blocks=4,
        initial_noise=torch.cat([s["initial"] for s in samples]),
        step_noise=torch.cat([s["step"] for s in samples], dim=2),
        context_noise=torch.cat([s["context"] for s in samples], dim=1),
        exit_steps=[exit_step, 0, 3, 1],
        score_timestep=torch.cat([s["t"] for s in samples]),
        score_noise=torch.cat([s["score"] for s in samples]),
    )


@pytest.mark.parametrize("exit_step", [0, 2])
def test_batch_of_two_equals_two_single_runs(exit_step):
    """Batch 2 (the reference fails there) gives the mean of the two batch-1 losses and
    gradients, and each sample's own rollout, DMD gradient and timesteps (float64)."""
    torch.set_num_threads(1)
    dtype = torch.float64
    config = ScoreConfig.compat()
    models = _tiny_models(dtype, config)
    gen = models.stepper.generator
    cond = tiny_prompt(batch=2).to(dtype)
    uncond = tiny_prompt(batch=2, seed=3).to(dtype)
    samples = [_sample_draws(10 + i, exit_step, dtype) for i in range(2)]

    def run(rows: slice, draws: InjectedDraws):
        gen.zero_grad(set_to_none=True)
        out = generator_loss(models, cond[rows], uncond[rows], HW, TINY_ROLLOUT, config, draws)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in gen.named_parameters()}

    singles = [run(slice(i, i + 1), _draws([samples[i]], exit_step)) for i in range(2)]
    pair, pair_grads = run(slice(0, 2), _draws(samples, exit_step))

    assert pair.rollout.gradient_mask is not None and not pair.rollout.gradient_mask[:, :3].any()
    assert pair.rollout.exit_steps == [exit_step] * 4
    for i, (single, _) in enumerate(singles):
        assert torch.allclose(pair.rollout.latents[i : i + 1], single.rollout.latents, rtol=0, atol=1e-10)
        assert torch.allclose(pair.dmd_grad[i : i + 1], single.dmd_grad, rtol=0, atol=1e-10)
        assert torch.equal(pair.dmd_timestep[i : i + 1], single.dmd_timestep)
    mean_loss = (singles[0][0].loss + singles[1][0].loss) / 2
    assert pair.loss.item() == pytest.approx(mean_loss.item(), rel=1e-10)
    mean_norm = (singles[0][0].dmdtrain_gradient_norm + singles[1][0].dmdtrain_gradient_norm) / 2
    assert pair.dmdtrain_gradient_norm.item() == pytest.approx(mean_norm.item(), rel=1e-10)
    largest = max(g.abs().max().item() for g in pair_grads.values())
    assert largest > 0
    for name, g in pair_grads.items():
        expected = (singles[0][1][name] + singles[1][1][name]) / 2
        err = (g - expected).abs().max().item()
        assert err <= 1e-9 * largest, f"{name}: {err:.3e} (largest {largest:.3e})"


@pytest.mark.parametrize("behaviour", ["compat", "clean"])
def test_critic_loss_trains_only_the_critic(behaviour):
    """The critic loss reaches the critic's parameters and nothing else; with one table (clean)
    it is exactly the flow-matching loss mean((v_net - (ε - x))²) on the generated sample."""
    torch.set_num_threads(1)
    config = ScoreConfig.compat() if behaviour == "compat" else ScoreConfig.clean()
    models = _tiny_models(torch.float64, config)
    cond = tiny_prompt(batch=1).to(torch.float64)
    sample = _sample_draws(5, 1, torch.float64)
    out = critic_loss(models, cond, HW, TINY_ROLLOUT, config, _draws([sample], 1))
    assert not out.rollout.latents.requires_grad
    out.loss.backward()
    critic = models.critic.model
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in critic.parameters())
    for other in (models.stepper.generator, models.teacher.model):
        assert all(p.grad is None for p in other.parameters())
    if behaviour == "clean":
        x = out.rollout.latents
        t = out.critic_timestep
        sigma = models.stepper.scheduler.sigma(t.flatten()).double().view(1, -1, 1, 1, 1)
        eps = sample["score"]
        x_t = (1 - sigma) * x + sigma * eps
        with torch.no_grad():
            v = critic(x_t.permute(0, 2, 1, 3, 4), t, cond).permute(0, 2, 1, 3, 4)
        expected = ((v - (eps - x)) ** 2).mean()
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_stage1_bank_timeline():
    """The compat stage-1 bank policy gives TRAINING.md §3.5's trace over a 21-frame rollout
    (released sizes: window 12, sink 3, bank 3, record_interval 3): the open slot is rewritten
    with the previous block's first frame on every commit, the pointer moves every 3 blocks."""
    torch.set_num_threads(1)
    from memflow.chunk_loop import ChunkHooks
    from memflow.noise import SeededNoise

    stream = StreamConfig(memory=memory_preset(True, "stage1"))
    stepper = ChunkStepper(tiny_dit(), stream, SamplingConfig())
    config = RolloutConfig()
    state = stepper.new_state(1, (2, 2), 21, cache_frames=config.cache_frames(12),
                              track_frames=True)
    seen = []
    hooks = ChunkHooks(on_chunk=lambda n, x0: seen.append(list(bank_of(state).slot_frames[0])))
    ctx = tiny_prompt()
    with torch.no_grad():
        stepper.rollout(ctx, 21, (2, 2), SeededNoise(0, dtype=torch.float32, context_noise=True),
                        exit_step=1, hooks=hooks, state=state)
    assert seen == [[], [0], [3], [6], [6, 9], [6, 12], [6, 15]]
