"""The reference's q_bank leak (TRAINING.md §10 item 5, §5.8): the committing re-run of a chunk
whose denoising exited at step 0 inherits that step's bank-refresh flag, so a saturated bank is
compressed once more per such chunk. `MemoryOptions.commit_refreshes_after_step0_exit` reproduces
it in compat mode; clean mode (and an exit at any later step) never refreshes on a commit.

The stage-2 scenario is the one of the issue's recording and of §5.8: one 75-frame sequence in
windows [0,21) [21,39) [39,57) [57,75), a switch at frame 39, exit steps 2, 0, 1, 3, a bank of 3
slots recording every 3rd chunk, so it saturates when chunk 9 (frame 27) is committed.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from conftest import TINY, bank_of, tiny_dit, tiny_prompt

import memflow.memory_bank as memory_bank
from config.inference import parse_settings
from config.schema import InferenceConfig
from config.stream import memory_preset
from memflow.chunk_loop import ChunkStepper
from memflow.config import MemoryOptions, SamplingConfig, StreamConfig, SwitchOptions
from memflow.memory_bank import MemoryBank
from memflow.streaming import StreamDebug
from trainer.draws import SeededDraws
from trainer.long_sequence import LongSequence, LongTuningConfig, SwitchSchedule
from trainer.rollout import RolloutConfig, training_rollout

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny calls: threads only add overhead

HW = (4, 4)
FPB = 3
SATURATED_CHUNKS = (10, 11, 12)  # chunks of the exit-0 window [21, 39) after f27 saturates the bank


class FixedExit(SeededDraws):
    """Seeded draws with a chosen exit step for every block."""

    def __init__(self, seed: int, exit_step: int):
        super().__init__(torch.Generator().manual_seed(seed))
        self.exit_step = exit_step

    def exit_steps(self, num_blocks: int, num_steps: int) -> list[int]:
        return [self.exit_step] * num_blocks


def _memory(compat: bool, leak: bool | None = None) -> MemoryOptions:
    memory = memory_preset(compat, "stage2")
    if leak is None:
        return memory
    return dataclasses.replace(memory, commit_refreshes_after_step0_exit=leak)


class Run:
    """A stage-2 sequence with its per-chunk records: the bank frames (layer 0) each chunk's
    denoising read, each chunk's x0, and every bank refresh with its call and result."""

    def __init__(self, memory: MemoryOptions, switch_frame: int = 39, seed: int = 0):
        compat = memory.reinsert_stale_prototype
        stream = StreamConfig(local_attn_size=12, sink_size=3, bank_size=3, record_interval=3,
                              memory=memory)
        self.stepper = ChunkStepper(tiny_dit(TINY, seed), stream, SamplingConfig())
        config = LongTuningConfig(
            window_frames=21, max_length=75, min_new_frames=18,
            switch=SwitchSchedule("fixed", fixed_index=switch_frame),
            switch_options=SwitchOptions.compat(global_sink=False) if compat else SwitchOptions(),
            recache_frames=21 if compat else None, refresh_text_per_window=not compat,
        )
        self.seq = LongSequence(
            self.stepper, config, prompts=["a"], switch_prompts=["b"], cond=tiny_prompt(seed=1),
            switch_cond=tiny_prompt(seed=2, length=7), latent_hw=HW, max_length=75,
            switch_frame=switch_frame, index=0, reencode=lambda clip: clip[:, :1] * 0,
            track_frames=True,
        )
        self.state = self.seq.state
        self.state.debug = StreamDebug()
        self.read: dict[int, list[int]] = {}
        self.x0: dict[int, torch.Tensor] = {}
        self.after_refresh: list[list[int]] = []  # bank frames after each refresh
        denoise, refresh = self.stepper.denoise, bank_of(self.state).refresh

        def spy_denoise(state, chunk, *args, **kwargs):
            x0 = denoise(state, chunk, *args, **kwargs)
            self.read[chunk] = list(bank_of(state).slot_frames[0])  # only step 0 changed the bank
            self.x0[chunk] = x0.detach().clone()
            return x0

        def spy_refresh(*args, **kwargs):
            action = refresh(*args, **kwargs)
            self.after_refresh.append(list(bank_of(self.state).slot_frames[0]))
            return action

        self.stepper.denoise = spy_denoise
        bank_of(self.state).refresh = spy_refresh

    def run(self, exit_steps: tuple[int, ...], grad: bool = False) -> "Run":
        for i, k in enumerate(exit_steps):
            with torch.set_grad_enabled(grad):
                self.seq.next_window(FixedExit(i, k), grad=grad)
        assert not self.seq.can_generate_more()
        return self

    @property
    def refreshes(self):
        return self.state.debug.memory_refreshes

    def compressions(self, kind: str) -> Counter:
        """Compressions per chunk by the calls of one kind (denoise / commit)."""
        out = Counter()
        for call, action in self.refreshes:
            is_commit = call.commit and not call.recache
            if action.get("bank") == "compress" and not call.recache and is_commit == (kind == "commit"):
                out[call.start_frame // FPB] += 1
        return out

    def recache_compressions(self) -> int:
        return sum(call.recache and action.get("bank") == "compress"
                   for call, action in self.refreshes)


def _prefer_recent(monkeypatch):
    """Score every stored frame by its frame index: compression keeps the newest frames, in
    descending order. That is what the picks of §5.8's trace amount to (they depend on the
    scores, which came from random weights), so the exact timeline can be checked."""
    original = MemoryBank._compress_layer
    current: list[torch.Tensor] = []

    def compress(self, layer, text_keys, text_mask):
        frames = torch.tensor(self.slot_frames[layer], dtype=torch.float32)
        current[:] = [frames.expand(text_keys.shape[0], -1)]
        return original(self, layer, text_keys, text_mask)

    monkeypatch.setattr(MemoryBank, "_compress_layer", compress)
    monkeypatch.setattr(memory_bank, "nam_scores", lambda *args, **kwargs: current[0])


# ------------------------------------------------------------------------------------------------
# Stage 2: the §5.8 timeline
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_stage2_compat_bank_timeline_of_section_5_8(monkeypatch):
    """Exit step 0 in the window [21, 39): the commit of every chunk compresses once more, so the
    bank goes [f0,f9,f18] -> [f18,f9,f27] -> [f27,f18,f27] -> [f27,f27,f27] and chunk 11 (f33)
    already reads the collapsed bank; without the leak it is one compression behind."""
    _prefer_recent(monkeypatch)
    leak = Run(_memory(True)).run((2, 0, 1, 3))
    behind = Run(_memory(True, leak=False)).run((2, 0, 1, 3))

    chain = []
    for frames in leak.after_refresh:
        if len(frames) == 3 and (not chain or frames != chain[-1]):
            chain.append(frames)
    assert chain[:4] == [[0, 9, 18], [18, 9, 27], [27, 18, 27], [27, 27, 27]]
    assert leak.read[10] == [18, 9, 27]  # the step-0 compression, then the commit's
    assert leak.read[11] == [27, 27, 27]  # "at f33"
    assert behind.read[10] == [18, 9, 27]
    assert behind.read[11] == [27, 18, 27]  # one compression behind
    assert behind.read[12] == [27, 27, 27]


@torch.no_grad()
def test_stage2_exits_after_step_0_follow_the_section_5_8_table(monkeypatch):
    """Control (no exit at step 0): the commit never refreshes and the timeline is §5.8's table;
    every refresh, the bank and every frame are identical with and without the option."""
    _prefer_recent(monkeypatch)
    runs = [Run(_memory(True, leak)).run((2, 1, 1, 3)) for leak in (True, False)]
    for run in runs:
        assert not any(call.commit and call.refresh_memory and not call.recache
                       for call, _ in run.refreshes)
        assert [run.read[n] for n in range(6, 13)] == [
            [0, 9], [0, 9, 18], [0, 9, 18], [0, 9, 18], [18, 9, 27], [27, 18, 27], [27, 27, 27],
        ]
        assert run.after_refresh[[c.recache for c, _ in run.refreshes].index(True)] == [27, 27, 36]
    assert runs[0].read == runs[1].read and runs[0].refreshes == runs[1].refreshes
    assert all(torch.equal(runs[0].x0[n], runs[1].x0[n]) for n in runs[0].x0)


# ------------------------------------------------------------------------------------------------
# Stage 2: compression counts with the model's own scores
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_stage2_compat_compresses_once_more_per_commit_after_a_step_0_exit():
    """Real (tiny, random) retrieval scores. Per chunk, compat compresses at step 0 from chunk 10
    on (1 per chunk) plus, at the commit, once per chunk of the exit-0 window after saturation
    (chunks 10, 11, 12): 2 there. The option off, the commits never compress (1 per chunk); the
    frames agree up to chunk 10's x0 and differ from chunk 11 on. Clean compresses once per new
    prototype (f27 at chunk 10, f36 at the switch's recache, f45, f54, f63)."""
    exits = (2, 0, 1, 3)
    leak, behind = Run(_memory(True)).run(exits), Run(_memory(True, leak=False)).run(exits)
    clean = Run(_memory(False)).run(exits)

    every_chunk = Counter({n: 1 for n in range(10, 25)})
    for run in (leak, behind):
        assert run.compressions("denoise") == every_chunk
        assert run.recache_compressions() == 1
    assert leak.compressions("commit") == Counter({n: 1 for n in SATURATED_CHUNKS})
    assert behind.compressions("commit") == Counter()
    per_chunk = leak.compressions("denoise") + leak.compressions("commit")
    assert [per_chunk[n] for n in range(9, 14)] == [0, 2, 2, 2, 1]
    # the commits of the exit-0 window before saturation re-insert (a no-op), as in stage 1
    assert [c.start_frame // FPB for c, a in leak.refreshes if c.commit and not c.recache
            and a.get("bank") == "insert"] == [7, 8, 9]

    assert all(torch.equal(leak.x0[n], behind.x0[n]) for n in range(11))
    assert (leak.x0[11] - behind.x0[11]).abs().max().item() > 1e-6

    assert clean.compressions("denoise") == Counter({10: 1, 16: 1, 19: 1, 22: 1})
    assert clean.compressions("commit") == Counter() and clean.recache_compressions() == 1


def test_commit_after_a_grad_exit_at_step_0_scores_with_the_text_cache_it_found(monkeypatch):
    """After the switch at 39 (window exit step 0): a gradient-carrying exit call leaves the text
    cache as it is (the reference's checkpointed path does not fill it), so the commit's extra
    compression scores with all-zero keys, like the recache and the step-0 call before it; B's
    keys drive retrieval from the next chunk on. A no-grad window fills the cache at step 0."""
    scored = []
    original = memory_bank.nam_scores

    def spy(text_keys, *args, **kwargs):
        scored.append(text_keys.abs().max().item() == 0)
        return original(text_keys, *args, **kwargs)

    monkeypatch.setattr(memory_bank, "nam_scores", spy)
    for grad in (True, False):
        scored.clear()
        run = Run(_memory(True)).run((2, 1, 0, 3), grad=grad)
        compressions = [(c.recache, c.commit, c.start_frame) for c, a in run.refreshes
                        if a.get("bank") == "compress"]
        zero = scored[:: TINY.num_layers]  # one score per layer and compression; layer 0
        switch = compressions.index((True, True, 18))  # the recache of frames 18..38
        assert compressions[switch + 1 : switch + 4] == [(False, False, 39), (False, True, 39),
                                                         (False, False, 42)]
        assert zero[switch : switch + 4] == [True, True, grad, False]


# ------------------------------------------------------------------------------------------------
# Stage 1
# ------------------------------------------------------------------------------------------------
def _stage1(monkeypatch, compat: bool, leak: bool, exit_step: int, bank_size: int,
            record_interval: int):
    memory = dataclasses.replace(memory_preset(compat, "stage1"),
                                 commit_refreshes_after_step0_exit=leak)
    stream = StreamConfig(local_attn_size=12, sink_size=3, bank_size=bank_size,
                          record_interval=record_interval, memory=memory)
    stepper = ChunkStepper(tiny_dit(), stream, SamplingConfig())
    states = []
    new_state = stepper.new_state

    def debug_state(*args, **kwargs):
        states.append(new_state(*args, **kwargs, debug=True))
        return states[-1]

    monkeypatch.setattr(stepper, "new_state", debug_state)
    with torch.no_grad():
        out = training_rollout(stepper, tiny_prompt(), HW, RolloutConfig(), FixedExit(0, exit_step),
                               grad=False)
    commits = Counter(c.start_frame // FPB for c, a in states[0].debug.memory_refreshes
                      if c.commit and a.get("bank") == "compress")
    steps = Counter(c.start_frame // FPB for c, a in states[0].debug.memory_refreshes
                    if not c.commit and a.get("bank") == "compress")
    return out.latents, steps, commits


def test_stage1_compat_compresses_once_more_per_commit_after_a_step_0_exit(monkeypatch):
    """A 21-frame rollout with a bank of 2 recording every chunk saturates at chunk 3: compat
    then compresses twice per chunk (step 0 and the commit), once with the option off."""
    _, steps, commits = _stage1(monkeypatch, True, True, exit_step=0, bank_size=2, record_interval=1)
    _, steps_off, commits_off = _stage1(monkeypatch, True, False, exit_step=0, bank_size=2,
                                        record_interval=1)
    assert steps == steps_off == Counter({n: 1 for n in range(3, 7)})
    assert commits == Counter({n: 1 for n in range(3, 7)}) and commits_off == Counter()
    _, _, control = _stage1(monkeypatch, True, True, exit_step=1, bank_size=2, record_interval=1)
    assert control == Counter()


def test_stage1_released_sizes_never_compress_so_the_leak_is_invisible(monkeypatch):
    """With the released bank (3 slots, record interval 3) a 21-frame rollout never compresses:
    the extra commit refresh re-inserts the same prototype and the rollout is bitwise equal."""
    on, steps, commits = _stage1(monkeypatch, True, True, exit_step=0, bank_size=3, record_interval=3)
    off, _, _ = _stage1(monkeypatch, True, False, exit_step=0, bank_size=3, record_interval=3)
    assert not steps and not commits
    assert torch.equal(on, off)


# ------------------------------------------------------------------------------------------------
# Where the option is on
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interactive", [False, True])
def test_inference_compat_leaks_only_in_the_interactive_script(interactive):
    """The interactive script's re-run passes the loop's q_bank on (visible with a one-step
    schedule); the single-prompt script's passes the default, False (INFERENCE.md §3.4)."""
    compat = parse_settings(InferenceConfig(behaviour="compat", num_output_frames=21), interactive)
    assert compat.stream.memory.commit_refreshes_after_step0_exit == interactive
    clean = parse_settings(InferenceConfig(num_output_frames=21), interactive=interactive)
    assert not clean.stream.memory.commit_refreshes_after_step0_exit


def test_training_compat_leaks_and_clean_does_not():
    for stage in (1, 2):
        assert memory_preset(True, f"stage{stage}").commit_refreshes_after_step0_exit
        assert not memory_preset(False, f"stage{stage}").commit_refreshes_after_step0_exit
    assert MemoryOptions.compat().commit_refreshes_after_step0_exit
    assert not MemoryOptions.clean().commit_refreshes_after_step0_exit
