"""FSDP2: a 2-process Gloo run with `fully_shard` per block trains like one process.

Each rank rolls out its own prompt and noise (with activation checkpointing) at the same exit
step (the ranks' DiT calls, hence their collectives, must match; the trainer broadcasts the exit
step). FSDP averages the gradients, so every rank's loss equals the one-process loss of its inputs and the gathered
gradients equal the mean of the two one-process gradients.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_training_gradients import FRAMES, HW, _loss, _stepper  # noqa: E402

from conftest import free_port, init_gloo, tiny_prompt  # noqa: E402
from memflow.noise import SeededNoise  # noqa: E402

WORLD = 2


def _rank_loss(stepper, rank: int) -> torch.Tensor:
    ctx = tiny_prompt(seed=10 + rank)
    noise = SeededNoise(100 + rank, dtype=torch.float32, context_noise=True)
    state = stepper.new_state(1, HW, FRAMES, cache_frames=FRAMES)
    out = stepper.rollout(ctx, FRAMES, HW, noise, exit_step=2, grad=True, state=state)
    return _loss(out)


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        from memflow.fsdp import shard_model

        stepper = _stepper(sma=True)
        shard_model(stepper.generator)
        stepper.generator.gradient_checkpointing = True
        loss = _rank_loss(stepper, rank)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in stepper.generator.named_parameters()}
        sharded = all(p.to_local().numel() < p.numel() for p in stepper.generator.parameters()
                      if p.dim() > 0 and p.shape[0] >= WORLD)
        torch.save({"loss": loss.item(), "grads": grads, "sharded": sharded},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fully_shard_two_processes_equals_one(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["sharded"] for r in results)

    single = []
    for rank in range(WORLD):
        stepper = _stepper(sma=True)
        stepper.generator.gradient_checkpointing = True
        loss = _rank_loss(stepper, rank)
        loss.backward()
        assert abs(loss.item() - results[rank]["loss"]) <= 1e-5 * abs(loss.item())
        single.append({n: p.grad for n, p in stepper.generator.named_parameters()})
    largest = max(g.abs().max().item() for g in single[0].values())
    for name in single[0]:
        mean = (single[0][name] + single[1][name]) / WORLD
        for r in results:
            err = (r["grads"][name] - mean).abs().max().item()
            assert err <= 1e-5 * largest, f"{name}: {err:.3e}"
