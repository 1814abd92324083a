"""No host synchronisation in a steady chunk: the generation hot path never reads a device
value on the host (`.item()`, `.tolist()`, `bool(t)`, `.cpu()`, `nonzero`, data-dependent
shapes), so on a GPU the host runs ahead and a chunk can be captured as a graph. Counted on the
CPU by `utils.probes.HostReads` (every tensor call and every aten op) over ten chunks past the
warm-up, with bank compressions, SMA and a prompt switch with recache."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_prompt
from streams import FULL, HW, noise, stepper

from memflow.stream import Stream
from pipeline.session import memory_view
from utils.probes import HostReads


def _stream(positions: str, static: bool, track_frames: bool = False) -> Stream:
    step = stepper(dataclasses.replace(FULL, positions=positions), static=static)
    state = step.new_state(1, HW, 90, track_frames=track_frames)
    stream = Stream(step, tiny_prompt(seed=1), noise(), latent_hw=HW, state=state)
    with torch.no_grad():
        for _ in range(5):  # warm-up: the window fills and rolls, the bank fills
            stream.next_chunk()
    return stream


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: no thread contention

@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("positions", ["absolute", "relative"])
def test_ten_steady_chunks_read_nothing_back(positions, static):
    stream = _stream(positions, static)
    with torch.no_grad(), HostReads() as reads:
        for i in range(10):
            if i == 4:
                stream.set_prompt(tiny_prompt(seed=2), "b")
            stream.next_chunk()
    assert stream.timeline[-1].label == "b"
    assert reads.total == 0, dict(reads.seen)


def test_the_probe_sees_a_host_read():
    """The counter is not blind: an `.item()` and a boolean mask index are counted."""
    x = torch.randn(4)
    with HostReads() as reads:
        x.sum().item()
        x[x > 0]
    assert reads.total >= 2


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_the_memory_view_is_a_readout_asked_for_once_per_chunk(static):
    """A live session's memory view reads the bank's choices back when it is asked, one
    transfer for every compression since the last view, and generation still reads nothing."""
    stream = _stream("absolute", static, track_frames=True)
    generating, viewing = HostReads(), HostReads()
    with torch.no_grad():
        for _ in range(4):
            with generating:
                stream.next_chunk()
            with viewing:
                view = memory_view(stream.state)
            assert view.bank and view.window
    assert generating.total == 0, dict(generating.seen)
    transfers = sum(n for where, n in viewing.seen.items() if where.startswith("tolist"))
    assert transfers == 4
