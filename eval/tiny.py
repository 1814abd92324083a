"""Tiny random CLIP and DINO folders, written with `save_pretrained`, so tests and the tiny preset
exercise the real local-folder loading without any download. Their scores are meaningless.

    python -m eval.tiny eval_models/tiny      # -> eval_models/tiny/{clip,dino}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from memflow.errors import InputError
from utils.video_writer import prepare_output_folder

_START, _END = "<|startoftext|>", "<|endoftext|>"


def _char_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: every printable ASCII character, with and without
    the end-of-word marker, plus the two special tokens."""
    chars = [chr(c) for c in range(33, 127)]
    return {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + [_START, _END])}


def save_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = _char_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
    special = {"bos_token_id": vocab[_START], "eos_token_id": vocab[_END], "pad_token_id": vocab[_END]}
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_dino(folder: Path, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="writes <folder>/clip and <folder>/dino")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = prepare_output_folder(args.folder)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(save_tiny_clip(root / "clip", args.seed), save_tiny_dino(root / "dino", args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
