"""Prompt files and switch points: what parses, and that every error names its file and line."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from memflow.errors import InputError
from utils.prompts import (
    effective_switch_chunks,
    load_interactive_prompts,
    load_prompts,
    parse_switch_frame_indices,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def jsonl(*objects: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared/data is absent in this checkout)")
    return path


# ---------------------------------------------------------------- single-prompt files


def test_txt_strips_trailing_whitespace_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "\ufeffA cat.  \r\n\r\n   \n  leading kept\t\nlast line")
    assert load_prompts(path) == ["A cat.", "  leading kept", "last line"]


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_txt_without_prompts_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "empty.txt", text)
    with pytest.raises(InputError, match="no prompts") as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_jsonl_accepts_prompt_and_prompts_keys(tmp_path: Path) -> None:
    text = jsonl({"prompt": "one"}, {"prompts": ["two", "ignored"]}) + "\n"
    text += json.dumps({"prompt": "three"})
    assert load_prompts(write(tmp_path, "p.jsonl", text)) == ["one", "two", "three"]


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(InputError, match=f"prompt file not found: {path}"):
        load_prompts(path)


def test_directory_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "dir.txt"
    folder.mkdir()
    with pytest.raises(InputError, match=f"prompt file is a directory: {folder}"):
        load_prompts(folder)


@pytest.mark.parametrize("name", ["prompts.csv", "prompts"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "a prompt\n")
    with pytest.raises(InputError, match="unsupported prompt file type") as info:
        load_prompts(path)
    assert str(path) in str(info.value) and ".txt or .jsonl" in str(info.value)


def test_interactive_loader_accepts_only_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, "p.txt", "a\n")
    with pytest.raises(InputError, match=r"expected \.jsonl"):
        load_interactive_prompts(path)


# (content of line 3, expected message fragment); lines 1-2 are a good line and a blank line, so
# the reported number must count physical lines, blank ones included.
JSONL_ERRORS = [
    ('{"prompt": "unterminated', "malformed JSON"),
    ('["a list"]', "expected a JSON object, got an array"),
    ('{"text": "x"}', 'expected a "prompt" string or a "prompts" array, found keys [\'text\']'),
    ('{"prompt": "   "}', '"prompt" is empty'),
    ('{"prompt": 42}', '"prompt" must be a string, got a number'),
    ('{"prompts": []}', '"prompts" is an empty array'),
    ('{"prompts": "abc"}', '"prompts" must be an array, got a string'),
    ('{"prompts": [null]}', '"prompts"[0] must be a string, got null'),
]


@pytest.mark.parametrize("line,message", JSONL_ERRORS)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    text = jsonl({"prompt": "fine"}) + "\n" + line + "\n" + jsonl({"prompt": "x"})
    path = write(tmp_path, "bad.jsonl", text)
    with pytest.raises(InputError) as info:
        load_prompts(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.txt", b"fine\ncaf\xe9\n")
    with pytest.raises(InputError, match=f"{path}:2: not valid UTF-8"):
        load_prompts(path)


# ---------------------------------------------------------------- interactive files


def test_interactive_example_file_parses_without_final_newline() -> None:
    path = shared_file("interactive_example.jsonl")
    assert not path.read_bytes().endswith(b"\n")  # P10: `wc -l` says 3
    videos = load_interactive_prompts(path)
    assert len(videos) == 4 and all(len(v) == 6 for v in videos)
    assert videos[0][0].startswith("A beekeeper")


def test_interactive_benchmark_file_parses() -> None:
    videos = load_interactive_prompts(shared_file("interactive_benchmark.jsonl"))
    assert len(videos) == 100
    assert all(len(v) == 6 and all(s.strip() for s in v) for v in videos)


def test_interactive_ignores_blank_lines(tmp_path: Path) -> None:
    text = "\n" + jsonl({"prompts": ["a", "b"]}) + "   \n" + json.dumps({"prompts": ["c", "d"]})
    assert load_interactive_prompts(write(tmp_path, "i.jsonl", text)) == [["a", "b"], ["c", "d"]]


def test_interactive_segment_count_mismatch_names_both_lines(tmp_path: Path) -> None:
    lines = [{"prompts": ["a", "b", "c"]}, {"prompts": ["d", "e", "f"]}, {"prompts": ["g", "h"]}]
    text = "\n" + jsonl(*lines)
    path = write(tmp_path, "i.jsonl", text)
    with pytest.raises(InputError) as info:
        load_interactive_prompts(path)
    assert str(info.value) == (
        f"{path}:4: 2 prompt segments, but line 2 has 3; every line needs the same number"
    )


@pytest.mark.parametrize(
    "obj,message",
    [
        ({"prompts": ["a", "", "c"]}, '"prompts"[1] is empty'),
        ({"prompts": ["a", "b", " \t"]}, '"prompts"[2] is empty'),
        ({"prompts": ["a", 3, "c"]}, '"prompts"[1] must be a string, got a number'),
        ({"prompt": "a"}, 'missing key "prompts"'),
    ],
)
def test_interactive_segment_errors_name_line_and_segment(
    tmp_path: Path, obj: dict, message: str
) -> None:
    path = write(tmp_path, "i.jsonl", jsonl({"prompts": ["x", "y", "z"]}, obj))
    with pytest.raises(InputError) as info:
        load_interactive_prompts(path)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)


def test_interactive_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "i.jsonl", "\n\n")
    with pytest.raises(InputError, match="no prompts"):
        load_interactive_prompts(path)


# ---------------------------------------------------------------- switch points


def test_released_switch_points() -> None:
    indices = parse_switch_frame_indices("40, 80, 120, 160, 200", 6, 240, 3)
    assert indices == [40, 80, 120, 160, 200]
    chunks = effective_switch_chunks(indices, 3, 80)
    assert chunks == [14, 27, 40, 54, 67]
    assert [3 * n for n in chunks] == [42, 81, 120, 162, 201]


@pytest.mark.parametrize("value", [[40, 80], (40, 80), OmegaConf.create([40, 80]), " 40 ,80 "])
def test_switch_points_accept_lists_and_strings(value: object) -> None:
    assert parse_switch_frame_indices(value, 3, 120, 3) == [40, 80]


def test_single_segment_needs_no_switch_points() -> None:
    assert parse_switch_frame_indices(None, 1, 120, 3) == []
    assert parse_switch_frame_indices("", 1, 120, 3) == []


@pytest.mark.parametrize(
    "value,message",
    [
        ("40, 80", "6 prompt segments need 5 switch indices, got 2"),
        ("40, 80, 120, 160, 200, 220", "need 5 switch indices, got 6"),
        ("40, 80, 160, 120, 200", "must be strictly increasing, got [40, 80, 160, 120, 200]"),
        ("40, 80, 80, 160, 200", "must be strictly increasing"),
        ("0, 80, 120, 160, 200", "0 is out of range; a switch must be a latent frame in 1..239"),
        ("40, 80, 120, 160, 240", "240 is out of range"),
        ("-4, 80, 120, 160, 200", "-4 is out of range"),
        ("40, 80.5, 120, 160, 200", "entry 2 ('80.5') of '40, 80.5, 120, 160, 200' is not an int"),
        ("40, abc, 120, 160, 200", "entry 2 ('abc')"),
        ("40,, 120, 160, 200", "entry 2 ('')"),
        ([40, 80, 120.0, 160, 200], "entry 3 (120.0) is not an integer"),
        ([40, True, 120, 160, 200], "entry 2 (True) is not an integer"),
        (3.5, "expected a comma-separated string or a list of integers"),
    ],
)
def test_switch_point_errors(value: object, message: str) -> None:
    with pytest.raises(InputError) as info:
        parse_switch_frame_indices(value, 6, 240, 3)
    assert str(info.value).startswith("switch_frame_indices: ")
    assert message in str(info.value)


def test_switches_in_one_chunk_are_serialised() -> None:
    assert effective_switch_chunks([40, 41, 42], 3, 80) == [14, 15, 16]
    assert effective_switch_chunks([3, 6, 9], 3, 80) == [1, 2, 3]


def test_serialisation_past_the_last_chunk_is_an_error() -> None:
    assert parse_switch_frame_indices("7", 2, 12, 3) == [7]  # fires at chunk 3 of 0..3
    with pytest.raises(InputError) as info:
        parse_switch_frame_indices("7, 8", 3, 12, 3)
    assert "switch 2 (frame 8) would fire at chunk 4 (frame 12), after the last chunk 3" in str(
        info.value
    )
    with pytest.raises(InputError, match="switch 1 \\(frame 10\\) would fire at chunk 4"):
        effective_switch_chunks([10], 3, 4)


def test_frames_must_fill_whole_chunks() -> None:
    with pytest.raises(InputError) as info:
        parse_switch_frame_indices("10", 2, 20, 3)
    assert str(info.value) == "num_output_frames (20) must be a multiple of num_frame_per_block (3)"


def test_switch_chunks_match_the_reference_loop() -> None:
    """Brute force: the reference checks, before each chunk n, whether n·fpb ≥ the next index."""
    rng = random.Random(0)
    for _ in range(300):
        fpb = rng.choice([1, 2, 3, 4])
        num_chunks = rng.randint(2, 30)
        frames = fpb * num_chunks
        indices = sorted(rng.sample(range(1, frames), rng.randint(1, min(6, frames - 1))))
        fired, segment = [], 0
        for n in range(num_chunks):
            if segment < len(indices) and n * fpb >= indices[segment]:
                fired.append(n)
                segment += 1
        if len(fired) == len(indices):
            assert effective_switch_chunks(indices, fpb, num_chunks) == fired
        else:  # the reference silently skips the switches that never fire; we refuse them
            with pytest.raises(InputError, match=f"switch {len(fired) + 1} "):
                effective_switch_chunks(indices, fpb, num_chunks)


@pytest.mark.parametrize("line, field", [('{"prompt": "a cat", "picture": "cat.png"}', "picture"),
                                         ('{"prompts": ["a cat"], "promts": ["a dog"]}', "promts")])
def test_an_unknown_field_of_a_prompt_line_is_an_error_naming_it(tmp_path, line, field) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(InputError, match=f'{path}:2: unknown field "{field}"'):
        load_prompts(path)
    if "prompts" in line:
        path.write_text('{"prompts": ["fine"]}\n' + line + "\n")
        with pytest.raises(InputError, match=f'{path}:2: unknown field "{field}"; did you mean "prompts"'):
            load_interactive_prompts(path)


@pytest.mark.parametrize("text, shown", [("a cat\x00 on a mat", "U+0000"), ("a \x1b[31mred cat", "U+001B")])
def test_control_characters_are_refused_offline_as_live(tmp_path, text, shown) -> None:
    from pipeline.live.protocol import ProtocolError, parse_message
    from pipeline.live.settings import ServerSettings

    txt, jsonl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    txt.write_text("fine\n" + text + "\n")
    jsonl.write_text(json.dumps({"prompts": ["fine", text]}) + "\n")
    with pytest.raises(InputError, match=re.escape(f"{txt}:2: the prompt holds the control character {shown}")):
        load_prompts(txt)
    with pytest.raises(InputError, match=re.escape(f'{jsonl}:1: "prompts"[1] holds the control character {shown}')):
        load_interactive_prompts(jsonl)
    with pytest.raises(ProtocolError, match=re.escape(f"holds the control character {shown}")):
        parse_message(json.dumps({"type": "start", "prompt": text}), ServerSettings(), 16.0)
