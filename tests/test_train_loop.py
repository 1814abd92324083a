"""DistillationTrainer end to end on the tiny config (configs/tiny_train_init.yaml), in process.

* the generator/critic update ratio;
* exact resume (after the last step and after a checkpoint that is not the last step);
* gradient accumulation == a bigger batch;
* two Gloo processes (FSDP2) with batch 1 each == one process with batch 2;
* the memory bank really holds frames during a training rollout, and the rollout reads it.

Each test prints the figure it measured (run with `-s` to see them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import bank_of, CPU, free_port, init_gloo, make_trainer, named_grads, named_params, train_settings
from trainer.config import CliFlags, TrainSettings, load_train_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_train_init.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_settings(logdir: Path | None = None, **overrides: Any) -> TrainSettings:
    return train_settings(CONFIG, logdir, **overrides)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over every tensor, relative to the largest |a| of all of them."""
    scale = max(v.abs().max().item() for v in a.values())
    assert scale > 0
    return max_abs_diff(a, b) / scale


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]


class RecordingLoader:
    """Wraps a PromptLoader and records the prompts of every batch it hands out."""

    def __init__(self, loader):
        self.loader = loader
        self.prompts: list[str] = []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        self.prompts.extend(batch.prompts)
        return batch

    def state_dict(self):
        return self.loader.state_dict()


# ------------------------------------------------------------------------------------------------
# 1. Update ratio
# ------------------------------------------------------------------------------------------------
def test_generator_trains_every_ratio_steps_critic_every_step():
    trainer = make_trainer(make_settings())
    assert trainer.settings.config.dfake_gen_update_ratio == 5
    gen0, crit0 = named_params(trainer.generator), named_params(trainer.critic)
    teach0 = named_params(trainer.teacher)

    m0 = trainer.train_step()  # step 0: generator and critic
    assert trainer.step == 1
    assert m0.generator_loss is not None and m0.generator_grad_norm > 0
    n_gen = sum(1 for p in trainer.generator.parameters() if p.requires_grad)
    n_crit = sum(1 for p in trainer.critic.parameters() if p.requires_grad)
    # every trainable parameter gets a gradient and moves (AdamW's first step moves each by ~lr)
    assert len(changed(gen0, trainer.generator)) == n_gen
    assert len(changed(crit0, trainer.critic)) == n_crit
    assert not changed(teach0, trainer.teacher)

    gen1, crit1 = named_params(trainer.generator), named_params(trainer.critic)
    m1 = trainer.train_step()  # step 1: 1 % 5 != 0, critic only
    assert trainer.step == 2
    assert m1.generator_loss is None and m1.generator_grad_norm is None
    assert m1.critic_grad_norm > 0
    assert not changed(gen1, trainer.generator), "the generator moved on a critic-only step"
    assert len(changed(crit1, trainer.critic)) == n_crit
    assert not changed(teach0, trainer.teacher)


# ------------------------------------------------------------------------------------------------
# 2. Resume
# ------------------------------------------------------------------------------------------------
def _tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested state dict into {path: leaf}."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}{k}/"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}{i}/"))
    else:
        out[prefix.rstrip("/")] = obj
    return out


def _snapshot(trainer) -> dict[str, Any]:
    return {
        "step": trainer.step,
        "generator": named_params(trainer.generator),
        "critic": named_params(trainer.critic),
        "ema": None if trainer.ema is None else {k: v.clone() for k, v in trainer.ema.state_dict().items()},
        "generator_opt": _tensors(trainer.generator_opt.state_dict()),
        "critic_opt": _tensors(trainer.critic_opt.state_dict()),
        "data": trainer.loader.state_dict(),
    }


def _compare(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Assert two snapshots agree; return the largest tensor difference found."""
    assert a["step"] == b["step"]
    assert a["data"] == b["data"]
    worst = max(max_abs_diff(a["generator"], b["generator"]), max_abs_diff(a["critic"], b["critic"]))
    assert (a["ema"] is None) == (b["ema"] is None)
    if a["ema"] is not None:
        worst = max(worst, max_abs_diff(a["ema"], b["ema"]))
    for key in ("generator_opt", "critic_opt"):
        assert a[key].keys() == b[key].keys(), key
        for path, va in a[key].items():
            vb = b[key][path]
            if torch.is_tensor(va):
                worst = max(worst, (va.double() - vb.double()).abs().max().item())
            else:
                assert va == vb, f"{key}/{path}: {va!r} != {vb!r}"
    return worst


def _log_records(logdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (logdir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("first_leg", [3, 4, 6],
                         ids=["stop-at-checkpoint", "stop-past-checkpoint", "resume-with-ema"])
def test_resume_is_exact(tmp_path, first_leg):
    """Run A: iterations 0..5 uninterrupted. Run B: `first_leg` iterations, then a new trainer
    on the same logdir resumes from the newest checkpoint (3 or 6; from 3 the generator's Adam
    state is used again at step 5, from 6 the EMA comes from the checkpoint) and finishes.
    Generator, critic, EMA, optimiser states and the data position agree at the end (step 6),
    bitwise."""
    overrides = dict(max_iters=6, log_iters=3)
    a = make_trainer(make_settings(tmp_path / "a", **overrides))
    a.run()
    assert a.step == 6 and a.ema is not None

    b1 = make_trainer(make_settings(tmp_path / "b", **overrides))
    b1.run(stop_after=first_leg)
    assert b1.step == first_leg
    del b1
    b2 = make_trainer(make_settings(tmp_path / "b", **overrides))
    resume_step = first_leg // 3 * 3
    assert b2.step == resume_step, f"should resume from checkpoint_model_{resume_step:06d}"
    assert b2.loader.state_dict()["batches_consumed"] == resume_step
    # ema_start_step 4: dropped on a resume before it (re-created at 4), else loaded
    assert (b2.ema is None) == (resume_step < 4)
    b2.run()
    assert b2.step == 6

    worst = _compare(_snapshot(a), _snapshot(b2))
    print(f"\n[resume first_leg={first_leg}] max |A - B| over weights/EMA/optimiser: {worst:.3e}")
    assert worst == 0.0

    # the log: B's records equal A's, each step once (the resume drops step 4 of the first leg)
    rec_a = {r["step"]: r for r in _log_records(tmp_path / "a")}
    rec_b = _log_records(tmp_path / "b")
    assert [r["step"] for r in rec_b] == list(range(1, 7))
    for r in rec_b:
        for key in ("generator_loss", "critic_loss", "critic_grad_norm", "generator_grad_norm"):
            assert r[key] == rec_a[r["step"]][key], (r["step"], key)
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint_model_*")) == [
        "checkpoint_model_000003", "checkpoint_model_000006"]


# ------------------------------------------------------------------------------------------------
# 3. Gradient accumulation
# ------------------------------------------------------------------------------------------------
def _one_iteration(**overrides: Any):
    trainer = make_trainer(make_settings(**overrides))
    trainer.loader = RecordingLoader(trainer.loader)
    metrics = trainer.train_step()
    return {
        "prompts": trainer.loader.prompts,
        "metrics": metrics,
        "gen_grad": named_grads(trainer.generator),
        "crit_grad": named_grads(trainer.critic),
        "gen": named_params(trainer.generator),
        "crit": named_params(trainer.critic),
    }


def test_gradient_accumulation_equals_a_bigger_batch():
    """batch 1 x 2 micro-steps == batch 2 x 1 at step 0 (generator + critic): same prompts, same
    gradients (so the loss is divided by the micro-step count), same updates."""
    acc = _one_iteration(batch_size=1, gradient_accumulation_steps=2)
    big = _one_iteration(batch_size=2, gradient_accumulation_steps=1)
    assert len(acc["prompts"]) == 2 and len(set(acc["prompts"])) == 2
    assert acc["prompts"] == big["prompts"]

    figures = {key: max_rel_diff(big[key], acc[key]) for key in ("gen_grad", "crit_grad")}
    figures["gen_weights"] = max_rel_diff(big["gen"], acc["gen"])
    figures["crit_weights"] = max_rel_diff(big["crit"], acc["crit"])
    print("\n[accumulation] max diff / max value: "
          + ", ".join(f"{k}={v:.2e}" for k, v in figures.items()))
    # The gradients: Adam is blind to a constant factor, so a missing or doubled 1/accumulation
    # factor shows here (off by 2x), not in the weights.
    assert figures["gen_grad"] <= 1e-5 and figures["crit_grad"] <= 1e-5
    # The weights, relative to the largest weight. AdamW's first step moves each weight by
    # lr * g / (|g| + eps): for the few gradients of size ~eps (1e-8) float32 noise in g moves
    # the update by a fraction of lr (1e-4); measured ~1e-6 (critic cross_attn.k, g ~ 4e-9).
    assert figures["gen_weights"] <= 1e-5 and figures["crit_weights"] <= 1e-5
    ma, mb = acc["metrics"], big["metrics"]
    assert ma.generator_grad_norm == pytest.approx(mb.generator_grad_norm, rel=1e-5)
    assert ma.critic_grad_norm == pytest.approx(mb.critic_grad_norm, rel=1e-5)
    assert ma.generator_loss == pytest.approx(mb.generator_loss, rel=1e-5)
    assert ma.critic_loss == pytest.approx(mb.critic_loss, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# 4. Two processes (FSDP2 over Gloo)
# ------------------------------------------------------------------------------------------------
WORLD = 2


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        trainer = make_trainer(make_settings(batch_size=1))
        sharded = all(isinstance(p, DTensor) for p in trainer.generator.parameters())
        trainer.loader = RecordingLoader(trainer.loader)
        metrics = trainer.train_step()

        def full_grads(model):
            return {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
                    for n, p in model.named_parameters() if p.grad is not None}

        full = StateDictOptions(full_state_dict=True)
        gen = get_model_state_dict(trainer.generator, options=full)
        crit = get_model_state_dict(trainer.critic, options=full)
        torch.save({"prompts": trainer.loader.prompts, "sharded": sharded,
                    "generator": {k: v.clone() for k, v in gen.items()},
                    "critic": {k: v.clone() for k, v in crit.items()},
                    "generator_grad": full_grads(trainer.generator),
                    "critic_grad": full_grads(trainer.critic),
                    "metrics": metrics.__dict__}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_batch1_equal_one_process_batch2(tmp_path):
    """Rank r of 2 (batch 1) sees prompt r of the epoch permutation (round-robin sharding) and
    draws as global sample r; one process with batch 2 sees prompts 0 and 1 as samples 0 and 1.
    FSDP2 averages the gradients, so the weights after step 0 (generator + critic) agree."""
    mp.spawn(_dist_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["sharded"] for r in ranks)

    single = make_trainer(make_settings(batch_size=2))
    single.loader = RecordingLoader(single.loader)
    metrics = single.train_step()
    assert [p for r in ranks for p in r["prompts"]] == single.loader.prompts
    assert len(set(single.loader.prompts)) == 2

    sd_gen = {k: v.detach() for k, v in single.generator.state_dict().items()}
    sd_crit = {k: v.detach() for k, v in single.critic.state_dict().items()}
    worst = grad_worst = 0.0
    for r in ranks:
        worst = max(worst, max_rel_diff(sd_gen, r["generator"]), max_rel_diff(sd_crit, r["critic"]))
    # the ranks hold the same full weights
    assert max_abs_diff(ranks[0]["generator"], ranks[1]["generator"]) == 0.0
    print(f"\n[2 processes] max |2-proc - 1-proc| / max|w|: {worst:.2e}; "
          f"grad norms gen {ranks[0]['metrics']['generator_grad_norm']:.6f} vs "
          f"{metrics.generator_grad_norm:.6f}")
    assert worst <= 1e-5
    for key in ("generator_grad_norm", "critic_grad_norm", "critic_loss"):
        assert ranks[0]["metrics"][key] == pytest.approx(getattr(metrics, key), rel=1e-5), key
    # the gradients (FSDP2's reduce-scatter averages over ranks; Adam would hide a factor)
    for role, model in (("generator_grad", single.generator), ("critic_grad", single.critic)):
        g1 = named_grads(model)
        for r in ranks:
            rel = max_rel_diff(g1, r[role])
            grad_worst = max(grad_worst, rel)
            assert rel <= 1e-5, role
    print(f"[2 processes] max gradient diff / max |g|: {grad_worst:.2e}")


# ------------------------------------------------------------------------------------------------
# 5. The memory bank during a training rollout
# ------------------------------------------------------------------------------------------------
def _bank_row(state, call) -> dict[str, Any]:
    bank = bank_of(state)
    tensors = [t for layer in bank.k + bank.v for t in layer]
    return {
        "chunk": call.start_frame // state.frames_per_block,
        "commit": call.commit,
        "used_slots": bank.used_slots,
        "filled": len(bank.k[0]),
        "max_abs": max((t.abs().max().item() for t in tensors), default=0.0),
        "finite": all(torch.isfinite(t).all().item() for t in tensors),
    }


def test_bank_holds_frames_during_the_generator_rollout(monkeypatch):
    """Hook every DiT call of step 0's generator rollout (the first rollout of the step) and
    record the bank as the call saw it: from chunk 1 on it holds a non-zero frame per layer."""
    from memflow.chunk_loop import ChunkStepper

    trainer = make_trainer(make_settings())
    assert trainer.settings.stream.bank_size == 2
    # One entry per rollout, in order. The states are held here so that a finished rollout's state
    # cannot be freed and its address reused by the next one (which would merge them under id()).
    states: list[Any] = []
    rows: list[list[dict[str, Any]]] = []
    original = ChunkStepper.dit

    def spy(self, state, x, t, context, call):
        out = original(self, state, x, t, context, call)
        if not any(s is state for s in states):
            states.append(state)
            rows.append([])
        rows[next(i for i, s in enumerate(states) if s is state)].append(_bank_row(state, call))
        return out

    monkeypatch.setattr(ChunkStepper, "dit", spy)
    trainer.train_step()
    generator_rollout, critic_rollout = rows
    for calls in (generator_rollout, critic_rollout):
        per_chunk = {}
        for row in calls:
            per_chunk.setdefault((row["chunk"], row["commit"]), row)
        chunk0, chunk1 = per_chunk[(0, False)], per_chunk[(1, False)]
        assert chunk0["filled"] == 0  # nothing committed yet
        assert chunk1["used_slots"] >= 1 and chunk1["filled"] >= 1
        assert chunk1["max_abs"] > 0 and chunk1["finite"]
        assert all(r["filled"] >= 1 and r["max_abs"] > 0 for r in calls if r["chunk"] >= 1)
    print("\n[bank, generator rollout] "
          + "; ".join(f"chunk {r['chunk']}{' commit' if r['commit'] else ''}: used_slots="
                      f"{r['used_slots']} filled={r['filled']} max|kv|={r['max_abs']:.3g}"
                      for r in generator_rollout))


def test_rollout_reads_the_bank():
    """Switching bank refreshes off changes chunk 1 of a training rollout and not chunk 0, so the
    bank is read (a bank stuck at zero or never inserted would leave chunk 1 unchanged)."""
    from trainer.draws import SampleDraws
    from trainer.rollout import training_rollout

    trainer = make_trainer(make_settings())
    s = trainer.settings
    stepper = trainer.models.stepper
    with torch.no_grad():
        cond = trainer.text_encoder.encode(["a red fox runs through snow"]).to(CPU, s.compute_dtype)

    def rollout():
        return training_rollout(stepper, cond, s.latent_hw, s.rollout,
                                SampleDraws(s.seed, 0, "generator", [0]), grad=False).latents

    with torch.no_grad():
        normal = rollout()
        from memflow.memory_bank import MemoryBank

        saved = MemoryBank.refresh
        MemoryBank.refresh = lambda self, *a, **k: None
        try:
            no_bank = rollout()
        finally:
            MemoryBank.refresh = saved
    fpb = s.frames_per_block
    assert torch.equal(normal[:, :fpb], no_bank[:, :fpb])
    diff = (normal[:, fpb:] - no_bank[:, fpb:]).abs().max().item()
    print(f"\n[bank read] max |chunk 1 with bank - without|: {diff:.3e}")
    assert diff > 1e-6


def test_visualisation_writes_videos_next_to_the_run(tmp_path):
    """vis_interval: every rank samples its validation prompts with the live generator through
    the inference stepper and writes MP4s into the run folder's vis/ (the reference's sibling vis/, TRAINING.md §8.3,
    would be shared by every run of one parent folder)."""
    trainer = make_trainer(make_settings(tmp_path / "run", max_iters=2, vis_interval=2,
                                         no_save=True))
    trainer.run()
    videos = sorted((tmp_path / "run" / "vis").rglob("*.mp4"))
    assert [v.name for v in videos] == ["step_0000002_rank_0_sample_0_len_6.mp4"]
    assert videos[0].stat().st_size > 0


def test_mixed_precision_keeps_fp32_master_weights(tmp_path):
    """mixed_precision: FSDP2 gathers the weights in the compute dtype (bf16) while the master
    weights, gradients and optimiser state stay float32; a step's losses stay close to the
    float32 run's. Exercised on CPU under a one-process Gloo group (GPUs use NCCL)."""
    reference = make_trainer(make_settings(max_iters=0, no_save=True)).train_step()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        trainer = make_trainer(make_settings(max_iters=0, no_save=True, mixed_precision=True,
                                             compute_dtype="bfloat16"))
        seen = []
        original = trainer.generator.blocks[0].forward
        trainer.generator.blocks[0].forward = lambda x, *a: seen.append(
            trainer.generator.blocks[0].modulation.dtype) or original(x, *a)
        metrics = trainer.train_step()
        assert seen and set(seen) == {torch.bfloat16}
        assert {p.dtype for p in trainer.generator.parameters()} == {torch.float32}
        assert {p.grad.dtype for p in trainer.critic.parameters() if p.grad is not None} == {torch.float32}
        state = trainer.generator_opt.state_dict()["state"]
        assert state and all(v["exp_avg"].dtype == torch.float32 for v in state.values())
    finally:
        dist.destroy_process_group()
    rel = abs(metrics.generator_loss - reference.generator_loss) / reference.generator_loss
    print(f"\nbf16 vs fp32 generator loss: {metrics.generator_loss:.6f} vs "
          f"{reference.generator_loss:.6f} (rel {rel:.1e})")
    assert 0 < rel < 0.05


def test_released_optimiser_settings_and_weight_decay_no_op():
    """configs/train_init.yaml: AdamW with betas (0, 0.999), eps 1e-8, weight decay 0.01 at lr
    2e-6 (generator) / 4e-7 (critic). In float32 the decoupled decay factor 1 - lr * wd rounds
    to 1, so a step equals one without decay bit for bit (the reference's own finding)."""
    from trainer.loop import _adamw

    cfg = load_train_config(REPO / "configs" / "train_init.yaml", [], CliFlags())
    settings = TrainSettings.from_config(cfg, check_files=False)
    for optim, lr in ((settings.generator_optim, 2e-6), (settings.critic_optim, 4e-7)):
        assert (optim.lr, tuple(optim.betas), optim.eps, optim.weight_decay) == (lr, (0.0, 0.999), 1e-8, 0.01)
        assert optim.max_grad_norm == 10.0
        g = torch.Generator().manual_seed(0)
        weights = torch.randn(64, 64, generator=g)
        grads = [torch.randn(64, 64, generator=g) for _ in range(3)]
        results = []
        for decay in (optim.weight_decay, 0.0):
            p = torch.nn.Parameter(weights.clone())
            opt = _adamw([p], type(optim)(**{**optim.__dict__, "weight_decay": decay}))
            for grad in grads:
                p.grad = grad.clone()
                opt.step()
            results.append(p.detach())
        assert torch.equal(*results) and not torch.equal(results[0], weights)
    assert settings.config.dfake_gen_update_ratio == 5 and settings.ema_weight == 0.99


def test_ema_starts_from_a_loaded_generator_ckpt(tmp_path):
    """A generator_ckpt past ema_start_step without an EMA entry: the EMA starts from the loaded
    weights, not from the weights the generator had before loading."""
    source = make_trainer(make_settings(max_iters=0, no_save=True))
    with torch.no_grad():
        for p in source.generator.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "base.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in source.generator.state_dict().items()},
                "step": 10}, ckpt)
    trainer = make_trainer(make_settings(max_iters=20, no_save=True, generator_ckpt=str(ckpt)))
    assert trainer.step == 10 and trainer.ema is not None
    shadow = trainer.ema.state_dict()
    for name, p in trainer.generator.named_parameters():
        assert torch.equal(shadow[name], p.detach().float()), name
