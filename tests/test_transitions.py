"""Prompt transitions and weighted prompts (memflow/prompt_blend.py, memflow/stream.py): a
transition of N chunks conditions its chunks on N distinct mixes of the two prompts, ending
exactly at the new one, without a recache; prompt files carry transitions and weighted prompts,
and a live session that uses them replays offline to the same latents."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_prompt
from streams import FULL, HW, noise, stepper
from test_session import CONFIG, SEED, SMALL, run_offline

from memflow.errors import InputError
from memflow.prompt_blend import Transition, blend_embeddings, weighted_embedding
from memflow.stream import Stream
from pipeline.session import Session
from utils.prompts import load_interactive_stories


@pytest.mark.parametrize("blend", ["linear", "slerp"])
def test_a_blend_moves_from_one_prompt_to_the_other_and_ends_on_it(blend):
    a, b = tiny_prompt(seed=1), tiny_prompt(seed=2)
    assert blend_embeddings(a, b, 1.0, blend) is b
    assert torch.allclose(blend_embeddings(a, b, 0.0, blend), a, atol=1e-6)
    mids = [blend_embeddings(a, b, t, blend) for t in (0.25, 0.5, 0.75)]
    to_a = [(m - a).norm().item() for m in mids]
    to_b = [(m - b).norm().item() for m in mids]
    assert to_a == sorted(to_a) and to_b == sorted(to_b, reverse=True)


def test_slerp_keeps_rows_on_the_arc_and_zero_rows_linear():
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 2.0], [4.0, 0.0]]])
    mid = blend_embeddings(a, b, 0.5, "slerp")
    assert torch.allclose(mid[0, 0], torch.tensor([1.5, 1.5]) / 2**0.5 * 1.0, atol=1e-6)
    assert torch.allclose(mid[0, 1], torch.tensor([2.0, 0.0]))  # a zero row: linear
    assert not torch.allclose(mid, blend_embeddings(a, b, 0.5, "linear"))


def test_weighted_prompt_is_the_normalised_mix():
    a, b = tiny_prompt(seed=1), tiny_prompt(seed=2)
    assert torch.allclose(weighted_embedding([a, b], [3, 1]), 0.75 * a + 0.25 * b, atol=1e-6)
    for weights in ([0, 0], [-1, 2], [float("nan"), 1]):
        with pytest.raises(ValueError):
            weighted_embedding([a, b], weights)
    with pytest.raises(ValueError, match="transition_chunks"):
        Transition(-1)
    with pytest.raises(ValueError, match="blend"):
        Transition(2, "cubic")


def _conditionings(transition: Transition, switched: list):
    step = stepper(FULL)
    original = step.switch_prompt
    step.switch_prompt = lambda *a, **k: (switched.append(True), original(*a, **k))[1]
    a, b = tiny_prompt(seed=1), tiny_prompt(seed=2)
    stream = Stream(step, a, noise(), latent_hw=HW, num_frames=30)
    seen, videos = [], []
    with torch.no_grad():
        for n in range(8):
            if n == 2:
                stream.set_prompt(b, "b", transition=transition)
            videos.append(stream.next_chunk())
            seen.append(stream.context)
    return a, b, seen, torch.cat(videos, dim=1)


@pytest.mark.parametrize("blend", ["linear", "slerp"])
def test_a_transition_of_n_chunks_gives_n_distinct_conditionings_ending_at_the_new_prompt(blend):
    switched: list = []
    a, b, seen, _ = _conditionings(Transition(4, blend), switched)
    assert all(torch.equal(c, a) for c in seen[:2])
    moving = seen[2:6]
    assert all(not torch.equal(c, a) and not torch.equal(c, b) for c in moving[:3])
    assert torch.equal(moving[3], b) and all(torch.equal(c, b) for c in seen[6:])
    assert len({tuple(c.flatten().tolist()) for c in moving}) == 4
    to_b = [(c - b).norm().item() for c in moving]
    assert to_b == sorted(to_b, reverse=True)
    assert not switched  # no recache during a transition


def test_a_hard_switch_recaches_and_a_transition_changes_the_video():
    switched: list = []
    _, _, seen, hard = _conditionings(Transition(0), switched)
    assert switched == [True] and torch.equal(seen[2], tiny_prompt(seed=2))
    _, _, _, soft = _conditionings(Transition(3), [])
    assert torch.equal(hard[:, :6], soft[:, :6]) and not torch.equal(hard[:, 6:], soft[:, 6:])


def test_prompt_files_carry_transitions_blends_and_weighted_prompts(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    lines = [{"prompts": ["a", [["b", 3], ["c", 1]], "d"], "switch_frame_indices": [3, 9],
              "transition_chunks": [2, 0], "blend": "slerp"},
             {"prompts": ["a", "b"], "switch_frame_indices": [3]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    first, second = load_interactive_stories(path)
    assert first.prompts == ["a", (("b", 3.0), ("c", 1.0)), "d"]
    assert first.transitions == [Transition(2, "slerp"), Transition(0, "slerp")]
    assert second.transitions is None


@pytest.mark.parametrize("field, message", [
    ('"transition_chunks": [1]', '"transition_chunks" has 1 entries for 2 switches'),
    ('"transition_chunks": -2', "transition_chunks must be an integer >= 0"),
    ('"blend": "cubic"', "blend must be one of linear, slerp"),
    ('"prompts": ["a", [["b", -1]], "c"]', "weight 0 must be a finite number >= 0"),
    ('"prompts": ["a", [["b", 0]], "c"]', "the weights are all 0"),
    ('"prompts": ["a", [["b"]], "c"]', "must be a [text, weight] pair"),
])
def test_bad_transitions_and_weights_name_the_line(tmp_path: Path, field, message):
    body = '"prompts": ["a", "b", "c"], "switch_frame_indices": [3, 6]'
    if field.startswith('"prompts"'):
        body = field + ', "switch_frame_indices": [3, 6]'
    else:
        body += ", " + field
    path = tmp_path / "bad.jsonl"
    path.write_text("{" + body + "}\n")
    with pytest.raises(InputError, match=f"{path}:1: .*" + message.replace("[", r"\[")):
        load_interactive_stories(path)


def test_a_session_with_weighted_prompts_and_transitions_replays_offline(tmp_path: Path):
    """A live session started from a weighted prompt, with a 2-chunk slerp transition and a
    hard switch: its sidecar's line replays through interactive inference to the same
    latents, bit for bit."""
    old = torch.get_num_threads()
    try:
        s = Session.from_config(CONFIG, SMALL)
        s.start([("a cat on a red chair", 2.0), ("a dog", 1.0)], seed=SEED)
        results = []
        for n in range(6):
            if n == 1:
                s.set_prompt("the cat jumps down", transition_chunks=2, blend="slerp")
            if n == 4:
                s.set_prompt([("the cat watches birds", 1.0), ("rain", 0.5)])
            results.append(s.next_chunk())
        timeline = s.timeline
        assert [(e.transition_chunks, e.blend) for e in timeline] == [
            (0, "linear"), (2, "slerp"), (0, "linear")]
        assert timeline[0].prompt == "a cat on a red chair:2 | a dog:1"
        _, sidecar = s.save_mp4(tmp_path / "clip.mp4")
    finally:
        torch.set_num_threads(old)
    meta = json.loads(sidecar.read_text())
    assert meta["interactive_jsonl"]["transition_chunks"] == [2, 0]
    line = tmp_path / meta["replay"]["data_path"]
    line.write_text(json.dumps(meta["interactive_jsonl"]) + "\n")
    replay = [o for o in meta["replay"]["overrides"] if not o.startswith("data_path=")]
    offline, _ = run_offline(tmp_path, [*replay, f"data_path={line}"])
    assert torch.equal(offline.cpu(), torch.cat([r.latents for r in results], dim=1))


def test_runtime_steps_and_seed_apply_at_the_next_chunk_and_replay_offline(tmp_path: Path):
    """Fewer denoising steps and a new seed, asked for between chunks, take effect at the next
    chunk (other latents than without them) and the saved line replays them bit for bit."""
    old = torch.get_num_threads()
    try:
        s = Session.from_config(CONFIG, SMALL)
        listed = list(s.settings.sampling.denoising_step_list)
        s.start("a cat", seed=SEED)
        plain = [s.next_chunk().latents for _ in range(3)]
        s.start("a cat", seed=SEED)
        steered = [s.next_chunk().latents]
        s.set_steps(listed[:1] + listed[-1:])
        steered.append(s.next_chunk().latents)
        s.set_seed(11)
        s.set_steps(None)
        steered.append(s.next_chunk().latents)
        assert torch.equal(plain[0], steered[0])
        assert not torch.equal(plain[1], steered[1]) and not torch.equal(plain[2], steered[2])
        with pytest.raises(ValueError, match="values of the denoising_step_list"):
            s.set_steps([123])
        with pytest.raises(ValueError, match="increasing"):
            s.set_steps(listed[::-1])
        _, sidecar = s.save_mp4(tmp_path / "clip.mp4")
    finally:
        torch.set_num_threads(old)
    meta = json.loads(sidecar.read_text())
    line = meta["interactive_jsonl"]
    assert line["chunk_steps"] == [[1, listed[:1] + listed[-1:]], [2, listed]]
    assert line["chunk_seeds"] == [[2, 11]]
    path = tmp_path / meta["replay"]["data_path"]
    path.write_text(json.dumps(line) + "\n")
    replay = [o for o in meta["replay"]["overrides"] if not o.startswith("data_path=")]
    offline, _ = run_offline(tmp_path, [*replay, f"data_path={path}"])
    assert torch.equal(offline.cpu(), torch.cat(steered, dim=1))
