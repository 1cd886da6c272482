"""MVQA (arXiv 2504.16003): video quality with a bidirectional Mamba over USDS samples.

USDS (``qscore.media.sampling.usds``) turns each frame into one 224x224 image: a 7x7 grid of
native-resolution 32x32 fragments (distortion) whose bottom-right 16x16 quadrants hold the tiles
of the whole frame resized to 112x112 (semantics). A VideoMamba backbone reads the 32-frame clip
as 1 + 32 x 196 tokens (regression token first, time-major) and a small head regresses the
regression token to a score. The backbone's parameter names are VideoMamba's, so its Kinetics-400
checkpoints (weights.toml keys ``videomamba-t16-k400`` / ``videomamba-m16-k400``) load into it.
The authors released no weights: a score needs a head trained with ``qscore train mvqa``.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qscore.cpus import usable_cpus
from qscore.media.sampling import IMAGENET_MEAN, IMAGENET_STD, channels_first, clip_indices, normalize, uniform_indices, usds
from qscore.media.video import open_video
from qscore.models.base import Model, ModelSpec
from qscore.models.mamba import IMPLS, MambaBlock
from qscore.types import Item, MissingWeights, Sample


@dataclass
class MVQAConfig:
    d_model: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    patch: int = 16  # token patch side (VideoMamba's "16")
    frames: int = 32  # frames per clip (T)
    interval: int = 2  # clip of `frames` frames `interval` apart; 0: spread over the whole video
    clips: int = 1  # test-time clips, spread over the video, scores averaged
    grid: int = 7  # USDS: grid x grid fragments per frame
    fragment: int = 32  # USDS: fragment side at native resolution; frame side = grid * fragment
    drop_path: float = 0.1  # stochastic depth, linear from 0 to this over the blocks
    head_hidden: int = 64
    backbone_lr_scale: float = 0.1  # backbone lr = this x the run's lr (FAST-VQA: 1e-4 vs 1e-3 head)
    scan: str = "auto"  # selective scan: auto (fused on CUDA when installed) | reference | fused
    backbone_weights: str = "videomamba-t16-k400"  # weights.toml key for `--backbone official`
    seed: int = 0  # run seed: per-file fragment offsets derive from it


NO_DECAY = ("cls_token", "pos_embed", "temporal_pos_embedding", "A_log", "A_b_log")


class VideoMamba(nn.Module):
    """VideoMamba's feature extractor with its checkpoint key names: ``patch_embed.proj``,
    ``cls_token``, ``pos_embed``, ``temporal_pos_embedding``, ``layers.N.{norm, mixer.*}``,
    ``norm_f``. (b, 3, T, H, W) -> the regression token's features (b, d_model)."""

    def __init__(self, cfg: MVQAConfig):
        super().__init__()
        side = cfg.grid * cfg.fragment
        if side % cfg.patch:
            raise ValueError(f"frame side {side} (grid x fragment) is not a multiple of patch {cfg.patch}")
        d = cfg.d_model
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv3d(3, d, (1, cfg.patch, cfg.patch), (1, cfg.patch, cfg.patch))})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (side // cfg.patch) ** 2, d))
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, cfg.frames, d))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        mixer = dict(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, impl=cfg.scan)
        self.layers = nn.ModuleList(MambaBlock(d, rate, **mixer) for rate in rates)
        self.norm_f = nn.RMSNorm(d, eps=1e-5)
        self._init(cfg.depth)

    def _init(self, depth: int) -> None:
        """Mamba's scheme (PyTorch's default for the projections, Mamba's own for dt, A and D)
        with truncated-normal position embeddings and out_proj scaled by 1/sqrt(depth), the
        GPT-2 rule for a residual stream of `depth` adds. VideoMamba's extra std-0.02 reset of
        every projection is left out: from scratch it leaves the scan's share of each output
        near 1e-6 of the skip path, so tokens barely mix at the start of training."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer in self.layers:
            layer.mixer.out_proj.weight.data /= depth**0.5

    def forward(self, video: Tensor) -> Tensor:
        x = self.patch_embed["proj"](video)  # (b, d, T, h, w)
        b, _, frames, _, _ = x.shape
        if frames != self.temporal_pos_embedding.shape[1]:
            raise ValueError(f"expected {self.temporal_pos_embedding.shape[1]} frames, got {frames}")
        x = x.flatten(3).permute(0, 2, 3, 1)  # (b, T, hw, d)
        x = x + self.pos_embed[:, None, 1:] + self.temporal_pos_embedding[:, :, None]
        token = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([token, x.flatten(1, 2)], dim=1).float()  # (b, 1 + T*hw, d), fp32 residual
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x[:, 0])  # RMSNorm is per token: only the regression token is needed


@dataclass
class USDSPreparer:
    """Item -> Sample: decode the clip's frames only, USDS per clip. ``inputs["video"]``: uint8
    (clips, T, 3, side, side) (the model normalises on the device). Picklable: holds only the
    sampling config."""

    frames: int
    interval: int
    clips: int
    grid: int
    fragment: int
    seed: int
    train: bool = False

    def __call__(self, item: Item) -> Sample:
        start = time.perf_counter()
        with open_video(item.path) as reader:
            indices = np.concatenate(self.clip_frames(reader.n_frames)).tolist()
            frames = reader.frames(indices)  # uint8 (clips * T, H, W, 3)
            facts = reader.facts()
        facts.update(frames_used=indices, decode_ms=1000 * (time.perf_counter() - start))
        # Training draws fresh fragment offsets every epoch (the worker's torch RNG); scoring
        # fixes them by the file so the same file always gives the same score.
        seed = int(torch.randint(2**62, ())) if self.train else item.seed(self.seed)
        # On uint8 views of the decoded frames (no float copy of a 4K clip); the device
        # normalises, and the copy there is a quarter of the bytes.
        clips = [usds(channels_first(clip), self.grid, self.fragment, seed + k) for k, clip in enumerate(np.split(frames, self.clips))]
        return Sample(item, {"video": torch.stack(clips)}, facts)  # uint8 (clips, T, 3, side, side)

    def clip_frames(self, n_frames: int) -> list[np.ndarray]:
        """Frame indices of each clip: the video cut into ``clips`` equal spans (at least one
        frame each), one clip in each."""
        bounds = np.linspace(0, n_frames, self.clips + 1).astype(int)
        clips = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            lo = min(lo, n_frames - 1)
            length = max(hi - lo, 1)
            pick = clip_indices(length, self.frames, self.interval) if self.interval else uniform_indices(length, self.frames)
            clips.append(lo + np.asarray(pick))
        return clips


class MVQA(Model):
    spec = ModelSpec(
        name="mvqa",
        task="video",
        summary="MVQA: bidirectional Mamba (VideoMamba) on USDS fragments + semantic tiles; no-reference video quality",
        paper="arXiv:2504.16003",
        licence="Apache-2.0 (VideoMamba code and Kinetics-400 weights); no official MVQA weights",
        score_range="unbounded, higher better: linear in the labels the head was trained on but not on their scale (PLCC + rank loss)",
    )
    Config = MVQAConfig

    def __init__(self, config: MVQAConfig):
        super().__init__(config)
        if config.scan not in IMPLS:
            raise ValueError(f"scan must be one of {', '.join(IMPLS)}, got {config.scan!r}")
        self.backbone = VideoMamba(config)
        self.head = nn.Sequential(nn.Linear(config.d_model, config.head_hidden), nn.GELU(), nn.Linear(config.head_hidden, 1))
        for layer in self.head:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def preparer(self, train: bool = False) -> Callable[[Item], Sample]:
        c = self.config
        clips = 1 if train else c.clips
        return USDSPreparer(c.frames, c.interval, clips, c.grid, c.fragment, c.seed, train)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        video = batch["video"]  # uint8 (b, clips, T, 3, H, W)
        features = self.features(backbone_input(video))  # (b*clips, d)
        scores = self.head(features).float().view(video.shape[0], video.shape[1])
        return {"score": scores.mean(1)}

    def features(self, clips: Tensor) -> Tensor:
        """Backbone features (n, d) of n clips. On the CPU without gradients, each clip goes
        through the backbone on its own, one thread per core side by side: the CPU's step-by-step
        scan is bound by memory latency and Python overhead, so one batched forward leaves a core
        idle and its larger working set falls out of the caches (MVQA-tiny, two clips on 2 cores:
        52.6 s as one batch, 29.2 s side by side). A clip's features are then bitwise the same
        whatever batch it came in."""
        if clips.device.type != "cpu" or torch.is_grad_enabled() or len(clips) == 1:
            return self.backbone(clips)
        inference = torch.is_inference_mode_enabled()

        def one(clip: Tensor) -> Tensor:
            with torch.inference_mode(inference), torch.no_grad():  # grad modes are per thread
                return self.backbone(clip)

        return torch.cat(list(_clip_threads().map(one, clips.split(1))))

    def trainable_parameters(self) -> list[dict]:
        """AdamW groups for ``qscore train``: the head at the run's lr, the backbone at
        ``backbone_lr_scale`` times it; no weight decay on position embeddings, the regression
        token, A, D, norms and biases (VideoMamba's and Mamba's choice)."""
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                scale = 1.0 if name.startswith("head.") else self.config.backbone_lr_scale
                decay = p.ndim > 1 and not name.endswith(NO_DECAY)
                groups.setdefault((scale, decay), []).append(p)
        return [{"params": ps, "lr_scale": scale, **({} if decay else {"weight_decay": 0.0})} for (scale, decay), ps in groups.items()]

    # ---- weights ----------------------------------------------------------------------------
    def load_backbone(self, registry: Any) -> list[str]:
        """VideoMamba's Kinetics-400 checkpoint for this size from weights.toml into the backbone
        (the quality head stays as it is). Returns the checkpoint keys it ignored."""
        from qscore.weights import load_state

        key = self.config.backbone_weights
        if not key:
            raise MissingWeights(f"no VideoMamba checkpoint matches d_model={self.config.d_model}, depth={self.config.depth}")
        return self.load_videomamba(load_state(registry.path(key)))

    def load_videomamba(self, state: dict[str, Tensor]) -> list[str]:
        """Load a VideoMamba state dict, strict on the backbone: every backbone tensor must be
        there with its shape (position embeddings are resampled to this grid and frame count).
        Returns the keys left out (VideoMamba's 400-class ``head.*`` and anything else extra)."""
        own = self.backbone.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"not a VideoMamba checkpoint for this backbone: missing {missing[:5]} ({len(missing)} in all)")
        picked = {k: _resample(k, state[k], own[k].shape) for k in own}
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in picked.items() if v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"VideoMamba checkpoint does not fit this preset: {'; '.join(wrong[:5])}")
        self.backbone.load_state_dict(picked, strict=True)
        return sorted(set(state) - set(own))


@functools.cache
def _clip_threads() -> ThreadPoolExecutor:
    """One thread per core this process may use, made once and kept."""
    return ThreadPoolExecutor(usable_cpus(), thread_name_prefix="qscore-mvqa")


def backbone_input(video: Tensor) -> Tensor:
    """The preparer's uint8 clips (b, clips, T, 3, H, W) as the backbone reads them: ImageNet-
    normalised floats (b*clips, 3, T, H, W)."""
    return normalize(video.flatten(0, 1).float() / 255, IMAGENET_MEAN, IMAGENET_STD).transpose(1, 2)


def _resample(key: str, value: Tensor, shape: torch.Size) -> Tensor:
    """Fit a checkpoint's position embeddings to this model: temporal (1, T, d) linearly over
    time, spatial (1, 1 + g*g, d) bicubically over the grid (the regression token's row kept)."""
    if value.shape == shape:
        return value
    if key == "temporal_pos_embedding":
        return F.interpolate(value.float().transpose(1, 2), size=shape[1], mode="linear", align_corners=False).transpose(1, 2)
    if key == "pos_embed":
        old, new = int((value.shape[1] - 1) ** 0.5), int((shape[1] - 1) ** 0.5)
        grid = value[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        return torch.cat([value[:, :1].float(), grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    return value
