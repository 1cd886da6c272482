"""Frame and spatial samplers shared by the models.

Pure functions of their inputs: any randomness comes from an explicit ``seed`` (models pass
``item.seed(run_seed)``), so a file gives the same sample in every run and batch.
Tensors are float (T, 3, H, W) in [0, 1] unless said otherwise.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qscore.types import MediaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LUMA = (0.299, 0.587, 0.114)


# ---- which frames -------------------------------------------------------------------------
def uniform_indices(n_frames: int, n: int) -> list[int]:
    """``round(linspace(0, N - 1, n))``: n frames spread over the whole video (repeats when
    the video is shorter than n)."""
    if n_frames < 1:
        raise MediaError("video has no frames")
    return np.round(np.linspace(0, n_frames - 1, n)).astype(int).tolist()


def clip_indices(n_frames: int, n: int, interval: int) -> list[int]:
    """A clip of n frames ``interval`` apart, centred in the video. When the video is shorter
    than the clip, the interval shrinks so the clip spans the whole video instead."""
    span = (n - 1) * interval + 1
    if span > n_frames:
        return uniform_indices(n_frames, n)
    start = (n_frames - span) // 2
    return [start + k * interval for k in range(n)]


def framediff_indices(reader, n: int, probe: int = 64, size: tuple[int, int] = (36, 64), slack: int = 0) -> list[int]:
    """Frame-difference sampling (Q-CLIP): the video is cut into n equal segments and each gives
    its frame of largest change. Change = mean absolute difference of small greyscale frames
    between consecutive probes; at most ``max(probe, n)`` frames are decoded, at ``size``."""
    n_frames = reader.n_frames
    if n_frames <= n:
        return uniform_indices(n_frames, n)
    probes = uniform_indices(n_frames, min(n_frames, max(probe, n)))  # distinct positions
    small, probes = reader.frames_near(probes, size=size, near=slack)  # probes: the frames served
    x = to_tensor(small)  # on the decoder's device
    grey = (x * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1)  # (m, h, w)
    change = torch.cat([torch.zeros(1), (grey[1:] - grey[:-1]).abs().mean((1, 2)).cpu()])
    segments = np.array_split(np.arange(len(probes)), n)
    return [probes[int(seg[int(torch.argmax(change[seg]))])] for seg in segments]


def pairs_indices(n_frames: int, n: int) -> list[int]:
    """``n / 2`` evenly spaced frames, each followed by the next one: [a0, a0 + 1, a1, a1 + 1, ...].
    Uniform frames a second or more apart cannot tell a held picture (stutter, dropped frames)
    from motion; a consecutive pair can (the same picture twice, or not)."""
    if n < 2 or n % 2:
        raise ValueError(f"the pairs sampler takes an even number of frames, got {n}")
    if n_frames < 2:
        return uniform_indices(n_frames, n)
    return [a + k for a in uniform_indices(n_frames - 1, n // 2) for k in (0, 1)]


FRAME_SAMPLERS = ("uniform", "framediff", "pairs")


def select_frames(reader, n: int, sampler: str = "uniform", slack: int = 0) -> list[int]:
    """``n`` frame indices by the named sampler: ``uniform`` (evenly spaced), ``framediff``
    (the frame of largest change in each of ``n`` equal segments; its probes may move ``slack``
    frames to reference frames, see ``VideoReader.frames_near``) or ``pairs`` (consecutive
    pairs, see ``pairs_indices``)."""
    if sampler == "framediff":
        return framediff_indices(reader, n, slack=slack)
    if sampler == "uniform":
        return uniform_indices(reader.n_frames, n)
    if sampler == "pairs":
        return pairs_indices(reader.n_frames, n)
    raise ValueError(f"sampler must be one of {', '.join(FRAME_SAMPLERS)}, got {sampler!r}")


def check_sampler(sampler: str, n: int) -> None:
    """A model config's sampler and frame count, checked when the model is built (not per file)."""
    if sampler not in FRAME_SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(FRAME_SAMPLERS)}, got {sampler!r}")
    if n < 1 or (sampler == "pairs" and n % 2):
        raise ValueError(f"{n} frames: the {sampler} sampler needs {'an even number' if sampler == 'pairs' else 'at least one'}")


def decode_slack(sampler: str, slack: int) -> int:
    """How far a sampled frame may move to a reference frame when decoded: ``slack``, except for
    ``pairs``, which decode exactly (a pair's second frame moved onto its first would be a hold)."""
    return 0 if sampler == "pairs" else slack


# ---- tensors ------------------------------------------------------------------------------
def to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, H, W) in [0, 1]; a single (H, W, 3) image -> (3, H, W)."""
    return channels_first(frames).float().div_(255.0).contiguous()


def channels_first(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, H, W) (a single image: (3, H, W)) as a view, no copy;
    an array, or a tensor (the GPU decoder's, on the device). The samplers below take it as it
    is: fragments are indexing, and antialiased resizing of uint8 in this (channels-last)
    layout is ~15x faster on the CPU than of a float copy."""
    x = frames if torch.is_tensor(frames) else torch.from_numpy(np.require(frames, requirements=("C", "W")))
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(2, 0, 1)


def to_numpy(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """An array of the frames, wherever they were decoded (the GPU decoder gives tensors)."""
    return frames.cpu().numpy() if torch.is_tensor(frames) else frames


def _interpolate(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Bilinear F.interpolate of (N, 3, H, W) keeping the dtype; uint8 off the CPU (which
    CUDA's kernels do not take) goes through float and is rounded back."""
    if x.dtype == torch.uint8 and x.device.type != "cpu":
        return _interpolate(x.float(), size, antialias).round_().clamp_(0, 255).to(torch.uint8)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def squash_resize(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize (..., 3, H, W) to ``size`` (int or (h, w)) ignoring aspect; bilinear, antialiased.
    Keeps the dtype: float, or uint8 (rounded)."""
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == hw:
        return x
    lead = x.shape[:-3]
    y = _interpolate(x.reshape(-1, *x.shape[-3:]), hw, antialias=True)
    return y.reshape(*lead, *y.shape[-3:])


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` on (..., 3, H, W)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def _cover(x: torch.Tensor, side: int) -> torch.Tensor:
    """Upsample (T, 3, H, W), aspect kept, so that both sides are at least ``side``."""
    h, w = x.shape[-2:]
    if min(h, w) >= side:
        return x
    s = side / min(h, w)
    hw = (max(side, math.ceil(h * s - 1e-6)), max(side, math.ceil(w * s - 1e-6)))
    return _interpolate(x, hw, antialias=False)


# ---- spatial samplers -----------------------------------------------------------------------
def fragments(
    x: torch.Tensor, grid: int = 7, patch: int = 32, seed: int = 0, group: int | None = None
) -> torch.Tensor:
    """FAST-VQA grid mini-patch sampling: (T, 3, H, W) -> (T, 3, grid*patch, grid*patch).

    The frame (upsampled first if a side is below grid*patch) is cut into grid x grid cells and
    one patch x patch patch at native resolution is taken from each, at a random offset inside
    its cell. The offsets are shared by each temporal group of ``group`` frames (default: all
    T), so a patch follows the same region over time.
    """
    out = grid * patch
    x = _cover(x, out)
    t, c, h, w = x.shape
    gen = torch.Generator().manual_seed(int(seed))
    group = group or t
    ys, xs = _cells(h, grid), _cells(w, grid)
    within = torch.arange(patch)
    pieces = []
    for g0 in range(0, t, group):
        u = torch.rand(2, grid, grid, generator=gen)  # where in its cell each patch starts
        top = ys[:-1].view(grid, 1) + (u[0] * (ys[1:] - ys[:-1] - patch + 1).view(grid, 1)).long()
        left = xs[:-1].view(1, grid) + (u[1] * (xs[1:] - xs[:-1] - patch + 1).view(1, grid)).long()
        rows = (top.view(grid, 1, grid, 1) + within.view(1, patch, 1, 1)).expand(grid, patch, grid, patch)
        cols = (left.view(grid, 1, grid, 1) + within.view(1, 1, 1, patch)).expand(grid, patch, grid, patch)
        rows, cols = rows.reshape(out, out).to(x.device), cols.reshape(out, out).to(x.device)
        pieces.append(x[g0 : g0 + group][:, :, rows, cols])
    return torch.cat(pieces)


def _cells(length: int, grid: int) -> torch.Tensor:
    """grid + 1 cell borders that split ``length`` as evenly as integers allow."""
    return torch.tensor([i * length // grid for i in range(grid + 1)])


def usds(
    x: torch.Tensor, grid: int = 7, patch: int = 32, seed: int = 0, group: int | None = None
) -> torch.Tensor:
    """MVQA Unified Semantic and Distortion Sampling: (T, 3, H, W) -> (T, 3, grid*patch, grid*patch).

    Fragments at native resolution carry distortion; the whole frame squashed to
    (grid*patch/2)^2 carries semantics. In fragment (i, j) the bottom-right (patch/2)^2 quadrant
    is replaced by tile (i, j) of the low-resolution frame, so each 224 frame holds 49 semantic
    and 147 distortion 16x16 tokens.
    """
    half = patch // 2
    frag = fragments(x, grid, patch, seed, group).contiguous()
    low = squash_resize(x, grid * half)
    t, c = frag.shape[:2]
    quads = frag.view(t, c, grid, 2, half, grid, 2, half)  # (.., i, row half, r, j, col half, q)
    quads[:, :, :, 1, :, :, 1, :] = low.reshape(t, c, grid, half, grid, half)
    return frag


def sliding_windows(
    x: torch.Tensor, size: int = 224, grid: tuple[int, int] = (3, 3)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Native-resolution windows on a regular, evenly spaced grid covering the frame.

    (T, 3, H, W) -> windows (T, G, 3, size, size) with G = grid[0] * grid[1] (row-major) and
    boxes (G, 4) int64 ``y0, x0, y1, x1`` in the original frame's pixels. Frames smaller than
    a window are upsampled (aspect kept) first; their boxes still refer to the original.
    """
    h, w = x.shape[-2:]
    big = _cover(x, size)
    bh, bw = big.shape[-2:]
    tops, lefts = _starts(bh, size, grid[0]), _starts(bw, size, grid[1])
    windows = torch.stack([big[:, :, y : y + size, x0 : x0 + size] for y in tops for x0 in lefts], dim=1)
    sy, sx = h / bh, w / bw
    boxes = torch.tensor(
        [
            [round(y * sy), round(x0 * sx), min(h, round((y + size) * sy)), min(w, round((x0 + size) * sx))]
            for y in tops
            for x0 in lefts
        ],
        dtype=torch.int64,
    )
    return windows, boxes


def _starts(length: int, size: int, k: int) -> list[int]:
    """k window starts from 0 to length - size, evenly spaced (centred when k == 1)."""
    if k == 1:
        return [(length - size) // 2]
    return [round(i * (length - size) / (k - 1)) for i in range(k)]
