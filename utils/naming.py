"""Output file names (spec §7.4), with prompt text made safe for any common filesystem.

The reference writes ``rank{r}-{prompt[:100]}-{seed_idx}.mp4`` for single prompts without
touching ``/`` (P4), so a prompt with a slash fails or writes into a subfolder. Here both
pipelines use one rule, the interactive script's ``..._{model_type}.mp4`` form, and the prompt
always goes through `sanitize_filename`. The reference's names start with the rank that wrote
the video, so they change with the number of processes; `behaviour: clean` leaves the rank out
(``{line}-{seed_idx}_{model_type}.mp4``), `compat` keeps it.
"""
from __future__ import annotations

import re
import unicodedata

# Characters Windows, macOS (":") or Linux ("/") reject in a file name.
_ILLEGAL = re.compile(r'[<>:"/\\|?*]')
# Bytes, not characters, are what filesystems limit (255 on ext4, APFS, NTFS). 200 leaves room
# for the "rank…-…_lora.mp4" wrapper and the writer's ".….partial.mp4" temporary name.
_MAX_BYTES = 200


def sanitize_filename(text: str, max_len: int = 100) -> str:
    """A readable, safe file-name fragment made from free text, never empty.

    Spaces are kept (runs of any whitespace collapse to one space) so ordinary prompts give the
    same name as the reference; illegal and invisible characters (control, format, e.g. bidi
    overrides) become ``_``; leading dots (hidden files) and trailing dots/spaces (dropped by
    Windows) are removed. The result has at most `max_len` characters and 200 UTF-8 bytes, and
    ``"untitled"`` stands in when nothing is left.
    """
    text = unicodedata.normalize("NFC", text)
    text = " ".join(text.split())
    text = "".join("_" if unicodedata.category(c).startswith("C") else c for c in text)
    text = _ILLEGAL.sub("_", text)[:max_len]
    while len(text.encode("utf-8")) > _MAX_BYTES:
        text = text[:-1]
    return text.lstrip(". ").rstrip(". ") or "untitled"


def video_filename(
    rank: int | None,
    index: int,
    seed_idx: int,
    model_type: str,
    prompt: str | None = None,
    save_with_index: bool = True,
    suffix: str = "",
) -> str:
    """``rank{rank}-{index}-{seed_idx}_{model_type}.mp4`` (the reference's), or without the
    ``rank{rank}-`` part when `rank` is None; the prompt in place of the index with
    ``save_with_index=False``.

    `index` is the global line index in the prompt file and `model_type` is "lora", "ema" or
    "regular". With ``save_with_index=False`` two prompts that agree on their first `max_len`
    characters (or sanitise alike, such as "." and "..") share a name, as in the reference;
    `suffix`, appended to the prompt part, tells them apart (see `pipeline.outputs.plan_videos`).
    """
    if save_with_index:
        middle = str(index)
    elif prompt is None:
        raise ValueError("video_filename: a prompt is required when save_with_index is False")
    else:
        middle = sanitize_filename(prompt)
    prefix = "" if rank is None else f"rank{rank}-"
    return f"{prefix}{middle}{suffix}-{seed_idx}_{model_type}.mp4"
