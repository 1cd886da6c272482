"""CLiF-VQA (arXiv 2311.07090): video quality from CLIP "human feelings" plus spatial features.

A frozen CLIP scores antonym prompt pairs ("a sharp video frame" / "a blurry video frame", ...)
on a grid of native-resolution windows of each sampled frame; the per-window probabilities are
averaged into a feeling vector and also mapped back to frame positions as the video's heatmap.
A trainable timm 2D backbone over FAST-VQA fragments (temporal mean and std; the std sees
flicker; with the ``pairs`` sampler also how much each consecutive pair changes, which sees
held pictures) gives spatial features; an MLP fuses [spatial ; feelings ; mean CLIP embedding] into
the score. Variants: ``mixed`` (the paper: every pair on the windows) and ``decoupled``
(CLiF-VQA+: objective pairs on the native windows, subjective pairs on the downscaled whole
frame). Without a trained head the score is the mean feeling probability (zero-shot,
CLIP-IQA-like; rows say ``head = zero-shot``).
Everything below the abstract level is our design: see docs/models/clifvqa.md.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from qscore.media.sampling import IMAGENET_MEAN, IMAGENET_STD, check_sampler, decode_slack, normalize
from qscore.models.base import Model, ModelSpec
from qscore.models.clip_common import AntonymPrompts, build_clip, encode_images
from qscore.types import Item, MissingWeights, Output, Sample

OBJECTIVE = "sharp/blurry, clean/noisy, bright/dark, colorful/dull, smooth/blocky"
SUBJECTIVE = (
    "comfortable to watch/uncomfortable to watch, beautiful/ugly, pleasant/annoying, natural/unnatural, good/bad"
)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """"sharp/blurry, clean/noisy" -> [("sharp", "blurry"), ("clean", "noisy")]."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        pos, sep, neg = part.partition("/")
        if not sep or not pos.strip() or not neg.strip():
            raise ValueError(f"prompt pair {part!r}: write it as positive/negative")
        pairs.append((pos.strip(), neg.strip()))
    return pairs


def feeling_name(positive: str) -> str:
    """The row column of a pair: its positive side's first word, e.g. "feel_comfortable"."""
    return "feel_" + re.sub(r"\W", "", positive.split()[0].lower())


@dataclass
class CLiFVQAConfig:
    variant: str = "mixed"  # "mixed" (paper) | "decoupled" (CLiF-VQA+)
    frames: int = 8
    sampler: str = "uniform"  # "uniform" | "framediff" | "pairs" (consecutive pairs: the spatial branch also sees holds)
    frame_slack: int = 1  # a frame may move this far to a reference frame (B-frames not decoded); 0: exact
    clip_arch: str = "ViT-B-16"
    clip_tiny: bool = False  # a tiny random CLIP (tests, tiny preset)
    window_grid: tuple = (3, 3)  # rows x columns of CLIP-size windows at native resolution
    objective: str = OBJECTIVE  # "positive/negative, ..." antonym pairs
    subjective: str = SUBJECTIVE
    objective_template: str = "a {} video frame"
    subjective_template: str = "a video frame that is {}"
    clip_chunk: int = 512  # windows per ViT call (memory bound, not a score change)
    fragment_grid: int = 7  # FAST-VQA fragments: grid x grid patches of patch x patch pixels
    fragment_patch: int = 32
    spatial_backbone: str = "resnet18"  # any timm 2D model name (random init, trainable)
    hidden: int = 256
    lr: float = 1e-3  # AdamW peak lr of the fusion head (qscore train --lr overrides it)
    backbone_lr_scale: float = 0.1  # spatial backbone lr = lr x this (1e-4 by default)
    max_side: int = 3840  # decode cap on the longer side (0: none); windows are native below it
    heatmap: bool = True  # write the per-video heatmap (costs a full-size overlay per file)
    seed: int = 0  # fragment sampling seed (mixed with the file's own seed)


def _check(config: CLiFVQAConfig) -> None:
    if config.variant not in ("mixed", "decoupled"):
        raise ValueError(f"variant {config.variant!r}: choose mixed or decoupled")
    check_sampler(config.sampler, config.frames)
    if len(config.window_grid) != 2 or min(config.window_grid) < 1:
        raise ValueError("window_grid needs two positive numbers (rows x columns)")


@dataclass
class CLiFVQAPrepare:
    """Item -> Sample: sampled frames as uint8 windows (T, G, 3, S, S) with their boxes, the
    downscaled whole frames (decoupled), fragments (T, 3, F, F) and the middle frame. Fragment
    offsets are fixed by the file when scoring and drawn afresh in training (augmentation)."""

    frames: int
    sampler: str
    slack: int
    window: int
    grid: tuple
    whole: bool
    fragment_grid: int
    fragment_patch: int
    keep_frame: bool
    max_side: int
    seed: int
    train: bool = False

    def __call__(self, item: Item) -> Sample:
        from qscore.media import sampling
        from qscore.media.video import open_video

        t0 = time.perf_counter()
        with open_video(item.path, max_side=self.max_side or None) as reader:
            indices = sampling.select_frames(reader, self.frames, self.sampler, self.slack)
            frames, used = reader.frames_near(indices, near=self.slack)  # uint8 (T, H, W, 3)
            facts = reader.facts()
        facts = {**facts, "frames_used": used, "decode_ms": (time.perf_counter() - t0) * 1e3}
        x = sampling.channels_first(frames)  # uint8 (T, 3, H, W), a view
        windows, boxes = sampling.sliding_windows(x, self.window, tuple(self.grid))  # (T, G, 3, S, S)
        seed = int(torch.randint(2**62, ())) if self.train else item.seed(self.seed)
        inputs = {  # uint8: a quarter of the bytes of floats to copy to the device
            "windows": windows.contiguous(),
            "fragments": sampling.fragments(x, self.fragment_grid, self.fragment_patch, seed).contiguous(),
        }
        if self.whole:
            inputs["frames"] = sampling.squash_resize(x, (self.window, self.window)).contiguous()
        keep = {"boxes": boxes.numpy(), "size": tuple(frames.shape[1:3])}  # boxes: (G, 4) y0, x0, y1, x1
        if self.keep_frame:
            keep["frame"] = np.ascontiguousarray(sampling.to_numpy(frames[len(frames) // 2]))
        return Sample(item, inputs, facts, keep)


def band_weights(starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """(length, K) weights of K bands [start, end) along one axis: each position averages the
    bands nearest to it (distance 0 = the bands covering it); rows sum to 1."""
    pos = np.arange(length)[:, None]
    gap = np.maximum(0, np.maximum(starts[None] - pos, pos - (ends[None] - 1)))
    near = gap == gap.min(1, keepdims=True)
    return near / near.sum(1, keepdims=True)


def window_heat(values: np.ndarray, boxes: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Per-window values (G,) of a row-major rows x cols grid -> float32 map (H, W). A pixel
    averages the windows covering it (overlaps of upsampled small frames); pixels between
    native-resolution windows take the nearest ones. boxes: (G, 4) y0, x0, y1, x1 in frame
    pixels. Window (r, c) covers (y, x) iff row band r covers y and column band c covers x,
    so the map is A @ V @ B.T with per-axis band weights A (H, rows), B (W, cols)."""
    rows, cols = grid
    a = band_weights(boxes[::cols, 0], boxes[::cols, 2], size[0])
    b = band_weights(boxes[:cols, 1], boxes[:cols, 3], size[1])
    return (a @ values.reshape(rows, cols) @ b.T).astype(np.float32)


class CLiFVQA(Model):
    spec = ModelSpec(
        name="clifvqa",
        task="video",
        summary="CLIP human-feeling prompts on native windows + fragment spatial features (CLiF-VQA)",
        paper="arXiv:2311.07090 (ACM MM 2024); CLiF-VQA+ decoupled variant",
        licence="MIT (openai CLIP weights); qscore heads Apache-2.0",
        score_range="zero-shot: [0, 1], higher better; trained head or starter: unbounded, higher better, linear in the training labels but not on their scale (PLCC + rank loss); --weights random: any value",
        columns={feeling_name(p): pa.float32() for p, _ in parse_pairs(OBJECTIVE) + parse_pairs(SUBJECTIVE)},
        artefacts=("heatmap",),
    )
    Config = CLiFVQAConfig

    def __init__(self, config: CLiFVQAConfig):
        super().__init__(config)
        import timm

        _check(config)
        self.clip, tokenizer, mean, std, self.window = build_clip(config.clip_arch, None, config.clip_tiny)
        objective, subjective = parse_pairs(config.objective), parse_pairs(config.subjective)
        obj = [tuple(config.objective_template.format(t) for t in p) for p in objective]
        subj = [tuple(config.subjective_template.format(t) for t in p) for p in subjective]
        if config.variant == "mixed":
            self.window_prompts = AntonymPrompts(self.clip, tokenizer, obj + subj)
            self.frame_prompts = None
        else:
            self.window_prompts = AntonymPrompts(self.clip, tokenizer, obj)
            self.frame_prompts = AntonymPrompts(self.clip, tokenizer, subj)
        self.feeling_names = [feeling_name(p) for p, _ in objective + subjective]
        self.clip_norm = (mean, std)
        self.spatial = timm.create_model(config.spatial_backbone, pretrained=False, num_classes=0)
        stats = 4 if config.sampler == "pairs" else 2  # temporal mean, std (+ pair change: mean, min)
        width = stats * self.spatial.num_features + len(self.feeling_names) + self.clip.text_projection.shape[1]
        self.head = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1)
        )
        self.zero_shot = False  # set by load_headless when no trained head exists

    # ---- weights ----------------------------------------------------------------------------
    def load_headless(self, registry: Any) -> tuple[str, str]:
        """openai CLIP from weights.toml and no trained head: the score is zero-shot (mean feeling)."""
        self.load_backbone(registry)
        self.zero_shot = True
        return "clip-vit-b16-openai", "zero-shot"

    def load_backbone(self, registry: Any) -> None:
        """The frozen openai CLIP ViT-B/16 from weights.toml."""
        if self.config.clip_tiny:
            raise MissingWeights("the tiny preset has a random CLIP: use --weights random or a trained checkpoint")
        from open_clip import load_checkpoint

        load_checkpoint(self.clip, str(registry.path("clip-vit-b16-openai")), strict=True)
        self.clip.requires_grad_(False)
        self._reset_prompts()

    def load_trained(self, state: dict[str, torch.Tensor], card: dict, registry: Any) -> None:
        super().load_trained(state, card, registry)
        self._reset_prompts()  # a checkpoint of a random-init run carries its own CLIP
        self.zero_shot = False

    def _reset_prompts(self) -> None:
        for prompts in (self.window_prompts, self.frame_prompts):
            if prompts is not None:
                prompts.reset()

    def trainable_parameters(self) -> list[dict]:
        """Fusion head at ``lr``, spatial backbone at ``lr x backbone_lr_scale``; CLIP frozen."""
        return [
            {"params": list(self.head.parameters())},
            {"params": list(self.spatial.parameters()), "lr_scale": self.config.backbone_lr_scale},
        ]

    def train(self, mode: bool = True) -> "CLiFVQA":
        """The CLIP stays in eval mode; training a head means the head scores from now on."""
        super().train(mode)
        self.clip.eval()
        if mode:
            self.zero_shot = False
        return self

    # ---- the four steps -----------------------------------------------------------------------
    def preparer(self, train: bool = False) -> CLiFVQAPrepare:
        c = self.config
        return CLiFVQAPrepare(
            frames=c.frames,
            sampler=c.sampler,
            slack=decode_slack(c.sampler, c.frame_slack),
            window=self.window,
            grid=tuple(c.window_grid),
            whole=c.variant == "decoupled",
            fragment_grid=c.fragment_grid,
            fragment_patch=c.fragment_patch,
            keep_frame=c.heatmap and self.maps and not train,
            max_side=c.max_side,
            seed=c.seed,
            train=train,
        )

    def feel(self, images: torch.Tensor, prompts: AntonymPrompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen CLIP on images (N, 3, S, S) in [0, 1] -> (feeling probabilities (N, K),
        L2-normalised embeddings (N, D))."""
        with torch.no_grad():
            emb = encode_images(self.clip, normalize(images, *self.clip_norm), self.config.clip_chunk)
            return prompts(emb), emb

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """windows uint8 (B, T, G, 3, S, S), fragments uint8 (B, T, 3, F, F), frames uint8
        (B, T, 3, S, S) for ``decoupled`` -> score (B,), feelings (B, K), window_quality (B, G)."""
        windows = batch["windows"]
        b, t, g = windows.shape[:3]
        p_win, emb = self.feel(windows.flatten(0, 2).float() / 255, self.window_prompts)
        p_win = p_win.view(b, t, g, -1)  # all windows of all videos went through CLIP together
        emb = emb.view(b, t * g, -1)
        feelings = p_win.mean((1, 2))
        if self.frame_prompts is not None:
            p_frame, emb_frame = self.feel(batch["frames"].flatten(0, 1).float() / 255, self.frame_prompts)
            feelings = torch.cat([feelings, p_frame.view(b, t, -1).mean(1)], dim=1)
            emb = torch.cat([emb, emb_frame.view(b, t, -1)], dim=1)
        out = {"feelings": feelings, "window_quality": p_win.mean((1, 3))}
        if self.zero_shot:
            out["score"] = feelings.mean(1)
            return out
        frags = normalize(batch["fragments"].flatten(0, 1).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
        per_frame = self.spatial(frags).float().view(b, t, -1)  # (B, T, C)
        stats = [per_frame.mean(1), per_frame.std(1, correction=0)]
        if self.config.sampler == "pairs":  # how far each pair's second frame moved from its first: a hold barely does
            change = (per_frame[:, 1::2] - per_frame[:, 0::2]).abs()  # (B, T / 2, C)
            stats += [change.mean(1), change.amin(1)]
        spatial = torch.cat(stats, dim=1)  # (B, 2C), pairs (B, 4C)
        fused = torch.cat([spatial, feelings, emb.mean(1)], dim=1)
        out["score"] = self.head(fused).squeeze(1)
        return out

    def postprocess(self, outputs: dict[str, torch.Tensor], samples: Sequence[Sample]) -> list[Output]:
        results = []
        for i, sample in enumerate(samples):
            columns = {"score": float(outputs["score"][i])}
            columns.update(zip(self.feeling_names, outputs["feelings"][i].tolist()))
            result = Output(columns)
            if "frame" in sample.keep:
                from qscore.artefacts import overlay

                values = outputs["window_quality"][i].numpy()
                heat = window_heat(values, sample.keep["boxes"], self.config.window_grid, sample.keep["size"])
                result.artefacts["heatmap"] = overlay(sample.keep["frame"], heat)
                result.arrays["heatmap"] = heat
            results.append(result)
        return results
