"""Shared CLIP blocks: build an open_clip model (real or tiny random) and score antonym prompts.

Used by CLiF-VQA (feelings over sliding windows) and RSFIQA. The CLIP model is frozen by the
callers; text features of the prompts are computed once per device and kept as a buffer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# A ViT-B-16-shaped CLIP small enough for CPU tests: same tokenizer/vocabulary, 32x32 input.
TINY_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

LOGIT_SCALE = 100.0  # CLIP's learned temperature (exp(logit_scale) = 100 for the openai weights)


def build_clip(
    arch: str = "ViT-B-16",
    pretrained_path: str | Path | None = None,
    tiny: bool | dict[str, Any] = False,
    quick_gelu: bool = True,
) -> tuple[nn.Module, Any, tuple[float, ...], tuple[float, ...], int]:
    """An open_clip model in eval mode with every parameter frozen.

    ``tiny``: True (or a config dict like ``TINY_CFG``) builds a small random model for tests;
    ``pretrained_path`` is then not allowed. ``quick_gelu``: the openai weights were trained with
    QuickGELU, so keep it True for them. Returns ``(model, tokenizer, mean, std, image_size)``
    where tokenizer maps ``list[str] -> LongTensor (N, 77)`` and mean/std are the CLIP
    normalisation of the input in [0, 1].
    """
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    if tiny and pretrained_path is not None:
        raise ValueError("a tiny CLIP is random; it cannot load pretrained weights")
    cfg = (TINY_CFG if tiny is True else tiny) if tiny else open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    model = open_clip.CLIP(**cfg, quick_gelu=quick_gelu)  # built in place: works on the meta device
    if pretrained_path is not None:
        open_clip.load_checkpoint(model, str(pretrained_path), strict=True)
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-16" if tiny else arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return model, tokenizer, tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD), size


def encode_images(clip_model: nn.Module, images: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """L2-normalised image embeddings. images: float (N, 3, S, S), already CLIP-normalised at
    the model's input size; ``chunk`` bounds how many go through the ViT at once. -> (N, D)."""
    parts = images.split(chunk) if chunk else (images,)
    feats = torch.cat([clip_model.encode_image(p) for p in parts]) if len(images) else images.new_zeros(0, 1)
    return F.normalize(feats.float(), dim=-1)


class AntonymPrompts(nn.Module):
    """Probabilities of the positive side of K antonym prompt pairs, CLIP-IQA style.

    ``pairs``: [("a sharp photo", "a blurry photo"), ...]; ``template`` (e.g. "{} of a video
    frame.") wraps every text. Text features are computed once, in fp32 without autocast, on the
    first forward on a device, and cached in a non-persistent buffer; call ``reset()`` after the
    CLIP weights change (e.g. after loading the official checkpoint).
    The CLIP model is referenced, not registered: its owner holds (and moves) it.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Any,
        pairs: Sequence[tuple[str, str]],
        template: str | None = None,
    ):
        super().__init__()
        if not pairs:
            raise ValueError("AntonymPrompts needs at least one (positive, negative) pair")
        self.pairs = [tuple(p) for p in pairs]
        texts = [(template or "{}").format(t) for pair in self.pairs for t in pair]
        self._encode_text = clip_model.encode_text
        self.register_buffer("tokens", tokenizer(texts), persistent=False)  # (2K, L)
        self.register_buffer("text_features", None, persistent=False)  # (2K, D), L2-normalised

    def reset(self) -> None:
        self.text_features = None

    def features(self) -> torch.Tensor:
        """(K, 2, D) L2-normalised text features: [:, 0] positive, [:, 1] negative."""
        if self.text_features is None or self.text_features.device != self.tokens.device:
            # inference_mode(False): a plain tensor, still usable by training steps after an eval
            device = self.tokens.device.type
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device, enabled=False):
                self.text_features = F.normalize(self._encode_text(self.tokens).float(), dim=-1)
        return self.text_features.view(len(self.pairs), 2, -1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features: (N, D), normalised here (any scale is fine). -> (N, K) in [0, 1]:
        softmax(100 * [cos(f, t+), cos(f, t-)])[..., 0] per pair."""
        with torch.autocast(image_features.device.type, enabled=False):  # 100 x cos needs fp32
            f = F.normalize(image_features.float(), dim=-1)
            cos = torch.einsum("nd,kjd->nkj", f, self.features())  # (N, K, 2)
            return (LOGIT_SCALE * cos).softmax(dim=-1)[..., 0]
