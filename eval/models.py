"""The two scoring backbones, read from local folders only, with VBench's image transforms.

* CLIP (default ViT-B/32, `transformers.CLIPModel` + its tokenizer): image and text embeddings
  for the CLIP score, and image embeddings for background consistency (VBench uses OpenAI CLIP
  ViT-B/32 image features there; `CLIPModel.get_image_features` is the same projection).
* DINO ViT-B/16 (`transformers.ViTModel`, the `facebook/dino-vitb16` release): the class token
  after the final layer norm, which is what VBench's torch.hub `dino_vitb16` returns.

Frames arrive as uint8 [N, H, W, 3]. The transforms follow VBench's `clip_transform(224)` and
`dino_transform(224)` on video tensors: resize the short side to 224 (bicubic for CLIP, bilinear
for DINO, no antialiasing), round back to uint8 as torchvision does for uint8 input, centre-crop
224x224 for CLIP only (DINO sees the whole frame and interpolates its position embeddings), scale
to [0, 1] and normalise. Nothing is downloaded: a missing folder is one `InputError` line.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from memflow.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VBENCH_SIZE = 224  # VBench's n_px for both backbones

_HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


def require_model_folder(folder: str | Path, what: str, put_there: str) -> Path:
    """`folder` if it holds a transformers `config.json`; otherwise one line saying what to put
    there (weights never come from a hub at run time)."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        state = "has no config.json" if folder.is_dir() else "not found"
        raise InputError(f"{what} folder {folder} {state}: put {put_there} there")
    return folder


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the names and contents of the folder's config, weight and tokenizer files, so
    a report names the exact weights it was computed with."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _HASHED_SUFFIXES):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _resize_short_side(frames: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """torchvision `Resize(size, antialias=False)` on uint8 [N, 3, H, W]: the short side becomes
    `size`, the long side int(size * long / short); the result is rounded to uint8 values."""
    h, w = frames.shape[-2:]
    if h <= w:
        out_hw = (size, int(size * w / h))
    else:
        out_hw = (int(size * h / w), size)
    x = F.interpolate(frames.float(), size=out_hw, mode=mode, align_corners=False, antialias=False)
    return x.round_().clamp_(0, 255)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean_t) / std_t


def clip_pixels(frames: torch.Tensor, size: int = VBENCH_SIZE) -> torch.Tensor:
    """VBench `clip_transform`: uint8 [N, H, W, 3] -> normalised float [N, 3, size, size]."""
    x = _resize_short_side(frames.permute(0, 3, 1, 2), size, "bicubic")
    return _normalize(_center_crop(x, size), CLIP_MEAN, CLIP_STD)


def dino_pixels(frames: torch.Tensor, size: int = VBENCH_SIZE) -> torch.Tensor:
    """VBench `dino_transform`: uint8 [N, H, W, 3] -> normalised float [N, 3, size, long side]."""
    x = _resize_short_side(frames.permute(0, 3, 1, 2), size, "bilinear")
    return _normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def _pooled(out) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4.x and an output object in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIP image/text embeddings (unnormalised; the metrics normalise)."""

    def __init__(self, folder: str | Path, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.folder = require_model_folder(
            folder, "CLIP model",
            "a transformers CLIP release (config.json, model.safetensors, tokenizer files), "
            "e.g. a local copy of openai/clip-vit-base-patch32, or pass --clip_model",
        )
        self.model = CLIPModel.from_pretrained(self.folder).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.device = device
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.fingerprint = folder_fingerprint(self.folder)

    @torch.no_grad()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = clip_pixels(frames.to(self.device), self.image_size)
        return _pooled(self.model.get_image_features(pixel_values=pixels)).float().cpu()

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Prompts longer than CLIP's context (77 tokens) are truncated, as every CLIP-score
        implementation does; the report says so."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True,
                                max_length=self.max_tokens, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"])
        return _pooled(out).float().cpu()


class DinoEncoder:
    """DINO ViT class-token features for subject consistency."""

    def __init__(self, folder: str | Path, device: torch.device) -> None:
        from transformers import ViTModel

        self.folder = require_model_folder(
            folder, "DINO model",
            "a transformers ViT release of DINO ViT-B/16 (config.json, model.safetensors), "
            "e.g. a local copy of facebook/dino-vitb16, or pass --dino_model",
        )
        self.model = ViTModel.from_pretrained(self.folder, add_pooling_layer=False).to(device).eval()
        self.device = device
        self.fingerprint = folder_fingerprint(self.folder)

    @torch.no_grad()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        pixels = dino_pixels(frames.to(self.device))
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 0].float().cpu()
