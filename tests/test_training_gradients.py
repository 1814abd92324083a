"""Exact gradients of a training rollout (issue: make the streaming core trainable).

A self-forcing rollout runs every chunk through the stepper with one exit step carrying
gradients; the cache, bank and earlier steps are constants of that graph. These tests check that
block-level activation checkpointing gives the very gradients of the forward (the reference's
recomputation re-reads a bank changed after the forward, TRAINING.md §3.5), that those are the
true derivatives (float64 finite differences), and which parameters the text path trains.
"""
from __future__ import annotations

import copy

import pytest
import torch

from memflow.chunk_loop import ChunkStepper
from memflow.config import MemoryOptions, SamplingConfig, StreamConfig
from memflow.noise import SeededNoise

from conftest import bank_of, tiny_dit, tiny_prompt

HW = (4, 6)
CHUNKS = 5
FRAMES = 3 * CHUNKS


def _stepper(sma: bool, dtype=torch.float32) -> ChunkStepper:
    """Window of 6 frames (3 sink), a 2-slot bank recording every chunk: the bank fills at
    chunks 1-2 and compresses (text retrieval) at chunks 3 and 4."""
    cfg = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1, sma=sma,
                       sma_top_k=2, memory=MemoryOptions.clean())
    model = tiny_dit().to(dtype)
    return ChunkStepper(model, cfg, SamplingConfig(context_noise=0.0))


def _rollout(stepper: ChunkStepper, exit_step: int, rolling: bool, seed: int = 0):
    ctx = tiny_prompt().to(stepper.generator.dtype)
    noise = SeededNoise(seed, dtype=stepper.generator.dtype, context_noise=True)
    state = stepper.new_state(1, HW, FRAMES, cache_frames=None if rolling else FRAMES)
    out = stepper.rollout(ctx, FRAMES, HW, noise, exit_step=exit_step, grad=True, state=state)
    return out, state


def _loss(out: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    return (out * weights).sum()


def _grads(stepper: ChunkStepper, exit_step: int, rolling: bool, checkpointing: bool):
    model = stepper.generator
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = checkpointing
    out, state = _rollout(stepper, exit_step, rolling)
    _loss(out).backward()
    model.gradient_checkpointing = False
    return {n: p.grad.clone() for n, p in model.named_parameters()}, state


@pytest.mark.parametrize("sma", [False, True], ids=["dense", "sma"])
@pytest.mark.parametrize("rolling", [True, False], ids=["rolling", "rollout_capacity"])
@pytest.mark.parametrize("exit_step", [0, 1, 2, 3])
def test_checkpointed_gradients_equal_plain_gradients(exit_step, rolling, sma):
    stepper = _stepper(sma)
    plain, state = _grads(stepper, exit_step, rolling, checkpointing=False)
    assert bank_of(state).opened > bank_of(state).slots  # the bank filled and compressed
    assert state.kv.fill == (6 if rolling else FRAMES) * state.frame_len
    ckpt, _ = _grads(stepper, exit_step, rolling, checkpointing=True)
    largest = max(g.abs().max().item() for g in plain.values())
    assert largest > 0
    for name, g in plain.items():
        err = (ckpt[name] - g).abs().max().item()
        assert err <= 1e-6 * largest, f"{name}: |ckpt - plain| = {err:.3e} (largest {largest:.3e})"


class _RecordingStepper(ChunkStepper):
    """Keeps, for every gradient-carrying call, a copy of the state before it and its inputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def dit(self, state, x, t, context, call):
        if torch.is_grad_enabled():
            self.calls.append((copy.deepcopy(state), x.detach().clone(), t, context, call))
        return super().dit(state, x, t, context, call)


def _replayed_loss(stepper: _RecordingStepper) -> float:
    """The rollout loss with every gradient-carrying call re-run on its recorded state and
    input: the forward as autograd sees it (cache, bank and noisy inputs held constant)."""
    chunks = []
    for state, x, t, context, call in stepper.calls:
        flow = ChunkStepper.dit(stepper, copy.deepcopy(state), x, t, context, call)
        b, f = x.shape[:2]
        t_all = torch.as_tensor(t).reshape(1).expand(b * f)
        x0 = stepper.scheduler.flow_to_x0(flow.flatten(0, 1), x.flatten(0, 1), t_all)
        chunks.append(x0.unflatten(0, (b, f)))
    return _loss(torch.cat(chunks, dim=1)).item()


@pytest.mark.parametrize("exit_step,sma", [(1, False), (2, True)])
def test_gradients_match_float64_finite_differences(exit_step, sma):
    base = _stepper(sma, dtype=torch.float64)
    stepper = _RecordingStepper(base.generator, base.stream_config, base.sampling)
    model = stepper.generator
    model.gradient_checkpointing = True
    out, state = _rollout(stepper, exit_step, rolling=True)
    assert bank_of(state).opened > bank_of(state).slots and len(stepper.calls) == CHUNKS
    _loss(out).backward()
    params = dict(model.named_parameters())
    probes = [
        ("blocks.0.self_attn.q.weight", (0, 1)),
        ("blocks.1.self_attn.k.weight", (3, 2)),
        ("blocks.1.cross_attn.k.weight", (1, 2)),
        ("blocks.0.cross_attn.norm_k.weight", (4,)),
        ("text_embedding.0.weight", (0, 0)),
        ("blocks.1.ffn.0.bias", (3,)),
        ("head.head.weight", (0, 0)),
    ]
    eps = 1e-6
    with torch.enable_grad():
        for name, idx in probes:
            p = params[name]
            analytic = p.grad[idx].item()
            with torch.no_grad():
                p[idx] += eps
            plus = _replayed_loss(stepper)
            with torch.no_grad():
                p[idx] -= 2 * eps
            minus = _replayed_loss(stepper)
            with torch.no_grad():
                p[idx] += eps
            numeric = (plus - minus) / (2 * eps)
            assert abs(numeric - analytic) <= 1e-6 + 1e-5 * abs(analytic), (name, numeric, analytic)


@pytest.mark.parametrize("exit_step", [0, 1, 3])
def test_text_path_trains_at_every_exit_step(exit_step):
    """In a gradient-carrying call the text K/V are recomputed with gradient, so the text
    embedding and cross_attn.k/v/norm_k train whatever the exit step; the text cache that the
    other calls (and bank retrieval) use never holds a graph."""
    stepper = _stepper(sma=False)
    grads, state = _grads(stepper, exit_step, rolling=True, checkpointing=True)
    for name in ("text_embedding.0.weight", "text_embedding.2.bias", "blocks.0.cross_attn.k.weight",
                 "blocks.1.cross_attn.v.bias", "blocks.1.cross_attn.norm_k.weight"):
        assert grads[name].abs().max().item() > 0, name
    assert all(not k.requires_grad and not v.requires_grad for k, v in state.text.kv)
    assert all(not k.requires_grad for k in state.kv.k)
    assert all(not s.requires_grad for layer in bank_of(state).k for s in layer)


def test_text_cache_is_built_once_per_prompt():
    """Outside gradient-carrying calls the text K/V come from the cache: one projection of the
    prompt per rollout, not one per call."""
    stepper = _stepper(sma=False)
    model = stepper.generator
    builds = []
    original = model.text_kv
    model.text_kv = lambda context: builds.append(1) or original(context)
    with torch.no_grad():
        ctx = tiny_prompt()
        stepper.rollout(ctx, FRAMES, HW, SeededNoise(0, dtype=torch.float32))
    assert len(builds) == 1


def test_only_the_exit_step_call_records_a_graph():
    stepper = _RecordingStepper(*(lambda s: (s.generator, s.stream_config, s.sampling))(_stepper(False)))
    out, _ = _rollout(stepper, exit_step=2, rolling=True)
    assert out.requires_grad and len(stepper.calls) == CHUNKS
    assert all(call.start_frame == 3 * n and not call.commit for n, (_, _, _, _, call) in enumerate(stepper.calls))
    assert [float(t) for _, _, t, _, _ in stepper.calls] == [float(stepper.timesteps[2])] * CHUNKS
