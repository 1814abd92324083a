"""Prompt files and prompt-switch points.

Every problem is reported as an `InputError` whose message starts with ``<file>:<line>:`` (1-based
physical line numbers), so a bad line in a 100-line benchmark file can be found without a
debugger. Files are read as UTF-8 (a BOM is accepted) and split on ``\\n`` only: JSON strings may
legally contain U+2028 and other characters that `str.splitlines` would treat as line breaks,
which would shift the reported line numbers.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.checker import did_you_mean
from memflow.errors import InputError
from memflow.files import reading
from memflow.prompt_blend import Transition, prompt_weights

_INT = re.compile(r"-?\d+")
# Fields a line of a .jsonl prompt file may carry; any other is an error naming it (a field this
# project does not read would otherwise be dropped without a word).
SINGLE_FIELDS = ("prompt", "prompts", "switch_frame_indices", "image", "video")
INTERACTIVE_FIELDS = ("prompts", "switch_frame_indices", "transition_chunks", "blend", "image",
                      "video", "chunk_steps", "chunk_seeds")
START_FIELDS = ("image", "video")  # a line's start image or video to continue (pipeline/start.py)

# One segment of a story: a prompt, or a weighted prompt ((text, weight), ...) whose
# conditioning is the weights' mix of its texts' (memflow.prompt_blend.weighted_embedding).
Segment = str | tuple[tuple[str, float], ...]


def segment_texts(segment: Segment) -> list[str]:
    """The texts a segment's conditioning is made of."""
    return [segment] if isinstance(segment, str) else [text for text, _ in segment]


def segment_label(segment: Segment) -> str:
    """A segment as one line of text: the prompt, or "text:weight | text:weight"."""
    if isinstance(segment, str):
        return segment
    return " | ".join(f"{text}:{weight:g}" for text, weight in segment)


def prompt_problem(text: str) -> str | None:
    """What makes `text` unusable as a prompt, or None: control characters (tab and newline
    aside) and lone surrogates. The one rule for prompt files and the live server."""
    for i, c in enumerate(text):
        if (ord(c) < 32 and c not in "\t\n") or ord(c) == 127:
            return f"holds the control character U+{ord(c):04X} at character {i}"
        if 0xD800 <= ord(c) <= 0xDFFF:
            return f"holds a lone surrogate U+{ord(c):04X} at character {i}"
    return None


def _read_lines(path: Path) -> list[str]:
    """The file's lines without line terminators (``\\r\\n`` files included)."""
    with reading(path, "prompt file"):
        data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte offset {e.start})") from None
    return [line.rstrip("\r") for line in text.split("\n")]


def _require_suffix(path: Path, allowed: tuple[str, ...]) -> None:
    if path.suffix.lower() not in allowed:
        raise InputError(
            f"{path}: unsupported prompt file type {path.suffix or '(no extension)'!r}; "
            f"expected {' or '.join(allowed)}"
        )


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages about the file's content."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names[type(value)]


def _json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {_json_type(obj)}")
        yield lineno, obj


def _check_text(value: Any, path: Path, lineno: int, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{path}:{lineno}: {where} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise InputError(f"{path}:{lineno}: {where} is empty")
    problem = prompt_problem(value)
    if problem is not None:
        raise InputError(f"{path}:{lineno}: {where} {problem}")
    return value


def _check_fields(obj: dict[str, Any], known: tuple[str, ...], path: Path, lineno: int) -> None:
    unknown = [key for key in obj if key not in known]
    if unknown:
        hint = did_you_mean(unknown[0], known, quote='"')
        raise InputError(f'{path}:{lineno}: unknown field "{unknown[0]}"{hint}; a line may carry '
                         f"{', '.join(known)}")


def _prompt_list(obj: dict[str, Any], path: Path, lineno: int) -> list[Any]:
    value = obj["prompts"]
    if not isinstance(value, list):
        raise InputError(f'{path}:{lineno}: "prompts" must be an array, got {_json_type(value)}')
    if not value:
        raise InputError(f'{path}:{lineno}: "prompts" is an empty array')
    return value


def load_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts for single-prompt generation, one video each, in file order.

    ``.txt``: one prompt per line with trailing whitespace stripped, as the reference reads it;
    blank lines are skipped. ``.jsonl``: each line is ``{"prompt": str}`` or ``{"prompts": [...]}``
    (only the first entry is used, so interactive files work too); "prompt" wins if both exist.
    """
    return [prompt for _, prompt in load_prompt_lines(path)]


def load_prompt_lines(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """`load_prompts` with the 1-based line of each prompt, for messages about one prompt."""
    path = Path(path)
    _require_suffix(path, (".txt", ".jsonl"))
    prompts: list[tuple[int, str]] = []
    if path.suffix.lower() == ".txt":
        prompts = [(n, _check_text(line.rstrip(), path, n, "the prompt"))
                   for n, line in enumerate(_read_lines(path), start=1) if line.strip()]
    else:
        for lineno, obj in _json_objects(path):
            if "prompt" in obj:
                value, where = obj["prompt"], '"prompt"'
            elif "prompts" in obj:
                value, where = _prompt_list(obj, path, lineno)[0], '"prompts"[0]'
            else:
                raise InputError(
                    f'{path}:{lineno}: expected a "prompt" string or a "prompts" array, '
                    f"found keys {sorted(obj)}"
                )
            _check_fields(obj, SINGLE_FIELDS, path, lineno)
            prompts.append((lineno, _check_text(value, path, lineno, where)))
    if not prompts:
        raise InputError(f"{path}: no prompts (the file is empty or has only blank lines)")
    return prompts


def load_interactive_prompts(path: str | os.PathLike[str]) -> list[list[Segment]]:
    """Segment lists for interactive generation: one ``{"prompts": [s0, ..., sK]}`` per line.

    Every line without its own ``"switch_frame_indices"`` must have the same number of segments,
    because one `switch_frame_indices` setting serves them all.
    """
    return [segments for _, segments in load_interactive_prompt_lines(path)]


def load_interactive_prompt_lines(path: str | os.PathLike[str]) -> list[tuple[int, list[Segment]]]:
    """`load_interactive_prompts` with the 1-based line of each story."""
    return [(story.line, story.prompts) for story in load_interactive_stories(path)]


@dataclass(frozen=True)
class InteractiveStory:
    """One line of an interactive prompt file. `switch_frame_indices`: the line's own switch
    frames (latent frames, as the config key; a saved live session's timeline replays this
    way), or None when the config's `switch_frame_indices` applies."""

    line: int
    prompts: list[Segment]
    switch_frame_indices: list[int] | None = None
    transitions: list[Transition] | None = None  # one per switch; None: all at once
    # a live session's runtime controls, by the chunk they took effect at: the denoising steps
    # (values of the config's list) and the seed the noise was drawn from
    chunk_steps: dict[int, list[int]] = field(default_factory=dict)
    chunk_seeds: dict[int, int] = field(default_factory=dict)


def load_interactive_stories(path: str | os.PathLike[str]) -> list[InteractiveStory]:
    """The stories of an interactive ``.jsonl`` file: ``{"prompts": [...]}`` per line, with an
    optional ``"switch_frame_indices"`` (a list of integers or the config's string form)."""
    path = Path(path)
    _require_suffix(path, (".jsonl",))
    stories: list[InteractiveStory] = []
    first: InteractiveStory | None = None  # the first line that uses the config's switches
    for lineno, obj in _json_objects(path):
        if "prompts" not in obj:
            raise InputError(f'{path}:{lineno}: missing key "prompts" (found keys {sorted(obj)})')
        _check_fields(obj, INTERACTIVE_FIELDS, path, lineno)
        segments = [
            _check_segment(s, path, lineno, f'"prompts"[{j}]')
            for j, s in enumerate(_prompt_list(obj, path, lineno))
        ]
        story = InteractiveStory(lineno, segments, _line_switches(obj, path, lineno),
                                 _line_transitions(obj, len(segments) - 1, path, lineno),
                                 _by_chunk(obj, "chunk_steps", path, lineno),
                                 _by_chunk(obj, "chunk_seeds", path, lineno))
        if story.switch_frame_indices is None:
            if first is None:
                first = story
            elif len(segments) != len(first.prompts):
                raise InputError(
                    f"{path}:{lineno}: {len(segments)} prompt segments, but line {first.line} has "
                    f"{len(first.prompts)}; every line needs the same number"
                )
        stories.append(story)
    if not stories:
        raise InputError(f"{path}: no prompts (the file is empty or has only blank lines)")
    return stories


def _check_segment(value: Any, path: Path, lineno: int, where: str) -> Segment:
    """A prompt string, or a weighted prompt: an array of [text, weight] pairs."""
    if not isinstance(value, list):
        return _check_text(value, path, lineno, where)
    if not value:
        raise InputError(f"{path}:{lineno}: {where} is an empty array")
    for k, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise InputError(f"{path}:{lineno}: {where}[{k}] must be a [text, weight] pair, got "
                             f"{_json_type(pair)}")
    texts = [_check_text(text, path, lineno, f"{where}[{k}][0]")
             for k, (text, _) in enumerate(value)]
    try:
        weights = prompt_weights([weight for _, weight in value])
    except ValueError as err:
        raise InputError(f"{path}:{lineno}: {where}: {err}") from None
    return tuple(zip(texts, weights))


def _by_chunk(obj: dict[str, Any], key: str, path: Path, lineno: int) -> dict[int, Any]:
    """A line's [[chunk, value], ...] (`chunk_steps`: a list of step values; `chunk_seeds`: a
    seed) as {chunk: value}."""
    entries = obj.get(key, [])
    out: dict[int, Any] = {}
    if not isinstance(entries, list):
        raise InputError(f'{path}:{lineno}: "{key}" must be an array of [chunk, value] pairs')
    for k, entry in enumerate(entries):
        ok = isinstance(entry, list) and len(entry) == 2 and _is_int(entry[0]) and entry[0] >= 0
        value = entry[1] if ok else None
        if key == "chunk_steps":
            ok = ok and isinstance(value, list) and bool(value) and all(_is_int(v) for v in value)
        else:
            ok = ok and _is_int(value)
        if not ok:
            kind = "a list of step values" if key == "chunk_steps" else "a seed"
            raise InputError(f'{path}:{lineno}: "{key}"[{k}] must be [chunk, {kind}], got '
                             f"{json.dumps(entry)[:60]}")
        out[entry[0]] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_switch(obj: dict[str, Any], key: str, switches: int, path: Path, lineno: int) -> list:
    """A line's `key`: one value for every switch, or an array of one per switch."""
    value = obj[key]
    values = value if isinstance(value, list) else [value] * switches
    if len(values) != switches:
        raise InputError(f'{path}:{lineno}: "{key}" has {len(values)} entries for {switches} '
                         "switches")
    return values


def _line_transitions(obj: dict[str, Any], switches: int, path: Path,
                      lineno: int) -> list[Transition] | None:
    """A line's ``"transition_chunks"`` and ``"blend"`` (each one value or one per switch)."""
    if "transition_chunks" not in obj and "blend" not in obj:
        return None
    chunks = _per_switch(obj, "transition_chunks", switches, path, lineno) \
        if "transition_chunks" in obj else [0] * switches
    blends = _per_switch(obj, "blend", switches, path, lineno) if "blend" in obj \
        else ["linear"] * switches
    try:
        return [Transition(n, b) for n, b in zip(chunks, blends)]
    except ValueError as err:
        raise InputError(f"{path}:{lineno}: {err}") from None


def line_starts(path: str | os.PathLike[str]) -> dict[int, tuple[str, Path]]:
    """The ``"image"`` or ``"video"`` a ``.jsonl`` line starts from, by line: (kind, path), the
    path relative to the prompt file's folder unless absolute. A file that is not there is an
    error now, before anything is generated."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        return {}
    starts = {}
    for lineno, obj in _json_objects(path):
        given = [key for key in START_FIELDS if key in obj]
        if len(given) > 1:
            raise InputError(f'{path}:{lineno}: a line starts from an "image" or a "video", '
                             "not both")
        if not given:
            continue
        kind, value = given[0], obj[given[0]]
        if not isinstance(value, str) or not value.strip():
            raise InputError(f'{path}:{lineno}: "{kind}" must be a file path, got '
                             f"{_json_type(value)}")
        media = Path(value) if Path(value).is_absolute() else path.parent / value
        if not media.is_file():
            raise InputError(f'{path}:{lineno}: the {kind} {media} does not exist or is not a file')
        starts[lineno] = (kind, media)
    return starts


def _line_switches(obj: dict[str, Any], path: Path, lineno: int) -> list[int] | None:
    """A line's own ``"switch_frame_indices"`` entries (checked against the video length later,
    by `parse_switch_frame_indices`), or None."""
    if "switch_frame_indices" not in obj:
        return None
    value = obj["switch_frame_indices"]
    if not isinstance(value, (list, str)):
        raise InputError(f'{path}:{lineno}: "switch_frame_indices" must be an array of integers, '
                         f"got {_json_type(value)}")
    try:
        return _switch_entries(value)
    except InputError as err:
        raise InputError(f"{path}:{lineno}: {err}") from None


def _switch_entries(value: str | int | Sequence[int] | None) -> list[int]:
    """The entries of a comma-separated string, a single int or a list of ints."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise InputError(f"switch_frame_indices: expected integers, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        pieces = [] if not value.strip() else [p.strip() for p in value.split(",")]
        for k, piece in enumerate(pieces, start=1):
            if not _INT.fullmatch(piece):
                raise InputError(
                    f"switch_frame_indices: entry {k} ({piece!r}) of {value!r} is not an integer"
                )
        return [int(p) for p in pieces]
    if isinstance(value, Sequence):
        for k, item in enumerate(value, start=1):
            if isinstance(item, bool) or not isinstance(item, int):
                raise InputError(f"switch_frame_indices: entry {k} ({item!r}) is not an integer")
        return list(value)
    raise InputError(
        "switch_frame_indices: expected a comma-separated string or a list of integers, "
        f"got {value!r}"
    )


def parse_switch_frame_indices(
    value: str | int | Sequence[int] | None,
    num_segments: int,
    num_output_frames: int,
    frames_per_block: int,
) -> list[int]:
    """Latent frames at which prompts 2..K+1 start, validated against the video length.

    Accepts the reference's string form (``"40, 80, 120"``) or a list. The indices must be
    strictly increasing and inside (0, num_output_frames), one per switch; they must also
    still fit once rounded up to chunk boundaries (see `effective_switch_chunks`), because the
    reference silently never performs a switch that lands past the end.
    """
    if num_output_frames % frames_per_block:
        raise InputError(
            f"num_output_frames ({num_output_frames}) must be a multiple of "
            f"num_frame_per_block ({frames_per_block})"
        )
    indices = _switch_entries(value)
    if len(indices) != num_segments - 1:
        raise InputError(
            f"switch_frame_indices: {num_segments} prompt segments need {num_segments - 1} switch "
            f"indices, got {len(indices)} ({value!r})"
        )
    for p in indices:
        if not 0 < p < num_output_frames:
            raise InputError(
                f"switch_frame_indices: {p} is out of range; a switch must be a latent frame "
                f"in 1..{num_output_frames - 1}"
            )
    if any(a >= b for a, b in zip(indices, indices[1:])):
        raise InputError(f"switch_frame_indices: must be strictly increasing, got {indices}")
    effective_switch_chunks(indices, frames_per_block, num_output_frames // frames_per_block)
    return indices


def effective_switch_chunks(
    indices: Sequence[int], frames_per_block: int, num_chunks: int
) -> list[int]:
    """The chunk at which each switch fires, exactly as the reference schedules it (spec K4).

    Before chunk n the reference switches if the next index p satisfies n·frames_per_block ≥ p,
    at most once per chunk. A switch therefore fires at the first chunk boundary ≥ p, or one
    chunk after the previous switch if that is later (40, 41 with 3-frame chunks → 14, 15).
    """
    chunks: list[int] = []
    for k, p in enumerate(indices, start=1):
        n = -(-p // frames_per_block)
        if chunks:
            n = max(n, chunks[-1] + 1)
        if n >= num_chunks:
            raise InputError(
                f"switch_frame_indices: switch {k} (frame {p}) would fire at chunk {n} (frame "
                f"{n * frames_per_block}), after the last chunk {num_chunks - 1}; switches are "
                f"rounded up to {frames_per_block}-frame chunk boundaries, at most one per chunk"
            )
        chunks.append(n)
    return chunks
