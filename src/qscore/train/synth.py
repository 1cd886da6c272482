"""Synthetic labelled data made from pristine photos, for training checks without a licensed
dataset (`qscore synth video|forgery`).

- Video quality: a clip is a camera move (pan + zoom) over one photo, then graded distortions
  (blur, noise, compression, stutter, flicker, exposure; level 1-5 each). Its score is
  ``mos = prod_k (1 - severity[k][level_k])`` in [0, 1], 1 = pristine: a fixed, monotone
  function of the levels (the table is ours, not a perceptual study).
  A fraction of the clips (``clip_fraction``) are instead windows of frames from real clips
  (``--clips``, e.g. ../shared/data/video) cropped to the frame size, with the same
  distortions and score.
- Forgery: splices (a BSDS segment from another photo), copy-moves (a segment of the same
  photo moved elsewhere) and inpaintings (a segment removed and filled from its surroundings
  by biharmonic inpainting plus matching grain), the mask being exactly the pixels that changed
  before post-processing; plus authentic negatives. JPEG (probability ``jpeg``) / resize / blur
  are then applied at random to every forged or authentic image (mask resized alongside,
  reference left pristine).

Every sample draws from its own ``np.random.default_rng([seed, kind, index])``, so output does
not depend on the number of workers. Splits are by source (a photo's or a clip's samples all
land in one of train/val/test; splice donors come from the same split).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter
from scipy.ndimage import binary_dilation, gaussian_filter

from qscore import __version__
from qscore.fsutil import atomic_file

log = logging.getLogger("qscore")
DEFAULT_PRISTINE = "../shared/data/pristine"
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))

# Per level 1..5: the distortion's parameter and its severity (fraction of quality lost).
VIDEO_PARAMS = {
    "blur": (0.8, 1.4, 2.2, 3.3, 5.0),  # Gaussian sigma, pixels
    "noise": (4.0, 8.0, 13.0, 20.0, 30.0),  # Gaussian std, 8-bit levels, fresh each frame
    "compression": (30, 35, 40, 45, 51),  # x264 CRF (undistorted clips use CLEAN_CRF)
    "stutter": (2, 3, 4, 6, 8),  # each shown picture is held this many frames (judder)
    "flicker": (0.03, 0.06, 0.10, 0.15, 0.22),  # per-frame gain jitter amplitude
    "exposure": (0.5, 1.0, 1.5, 2.0, 2.7),  # stops over or under (sign drawn per clip)
}
SEVERITY = {
    "blur": (0.10, 0.22, 0.37, 0.54, 0.70),
    "noise": (0.08, 0.18, 0.31, 0.46, 0.62),
    "compression": (0.10, 0.24, 0.40, 0.58, 0.75),
    "stutter": (0.06, 0.14, 0.25, 0.37, 0.50),
    "flicker": (0.06, 0.14, 0.25, 0.38, 0.52),
    "exposure": (0.08, 0.18, 0.31, 0.46, 0.62),
}
CLEAN_CRF = 16
LEVELS = 5
CLIP_FRACTION = 0.2  # default share of video samples taken from real clips (when there are clips)
FORGERY_KINDS = ("splice", "copymove", "inpaint")  # equally likely among the forged samples
INPAINT_MAX_PIXELS = 4000  # larger holes are inpainted at a reduced resolution (speed)


class SynthError(ValueError):
    """Bad generator options or missing pristine data (exit code 2 in the CLI)."""


# ---- sources and splits ------------------------------------------------------------------------
def pristine_photos(root: str | os.PathLike) -> list[Path]:
    """Every pristine photo: BSDS500 JPEGs and Kodak PNGs, sorted."""
    root = Path(root)
    photos = sorted((root / "bsds500" / "images").glob("*.jpg")) + sorted((root / "kodak").glob("*.png"))
    if not photos:
        raise SynthError(f"no pristine photos under {root} (expected bsds500/images/*.jpg, kodak/*.png); see --pristine")
    return photos


CLIP_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm")


def source_clips(clips: str | os.PathLike | None, pristine: str | os.PathLike = DEFAULT_PRISTINE) -> list[Path]:
    """The real clips to take windows from, sorted; names containing 'distorted' are skipped.
    ``clips``: a folder; "auto" = the ``video`` folder beside ``pristine`` if there (else no
    clips); None or "none" = no clips."""
    if clips is None or str(clips).lower() == "none":
        return []
    auto = str(clips).lower() == "auto"
    folder = Path(pristine).parent / "video" if auto else Path(clips)
    if not folder.is_dir():
        if auto:
            return []
        raise SynthError(f"--clips {folder}: not a folder (use --clips none for photos only)")
    found = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in CLIP_SUFFIXES and "distorted" not in p.name.lower() and p.is_file())
    if not found and not auto:
        raise SynthError(f"--clips {folder}: no video files ({', '.join(CLIP_SUFFIXES)}; *distorted* skipped)")
    return found


def clips_covering(videos: list[Path], size: tuple[int, int]) -> tuple[list[Path], dict[str, str]]:
    """The clips whose frames cover ``size`` (W, H) without upscaling, and why each other one is
    left out. An upscaled window is blurred by the upscaling, which its label (no blur) would not
    count: carphone_pristine's 176x144 at 224x224 was."""
    import av

    kept, skipped = [], {}
    for path in videos:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
        if w >= size[0] and h >= size[1]:
            kept.append(path)
        else:
            skipped[path.name] = f"{w}x{h} is smaller than --size {size[0]}x{size[1]}"
    return kept, skipped


def segmented_photos(root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(photo, segment label map) pairs of BSDS500, sorted."""
    images = Path(root) / "bsds500" / "images"
    pairs = [(p, images.parent / "segments" / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]
    pairs = [(p, s) for p, s in pairs if s.is_file()]
    if not pairs:
        raise SynthError(f"no BSDS500 photos with segments under {root}; see --pristine")
    return pairs


def source_order(n_sources: int, n: int, seed: int, stream: int = 0) -> tuple[np.ndarray, list[str]]:
    """Sample i uses source ``order[i % len(order)]``; ``split[j]`` is the split of the j-th
    source in that order (70/15/15 of the sources used, at least one each when possible).
    ``stream`` keeps the orders of different source pools (photos, clips) independent."""
    order = np.random.default_rng([seed, 0] if stream == 0 else [seed, 0, stream]).permutation(n_sources)
    used = min(n, n_sources)
    n_val = n_test = max(1, round(0.15 * used)) if used >= 3 else 0
    split = ["train"] * (used - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return order[:used], split


def sample_source(i: int, order: np.ndarray, split: list[str]) -> tuple[int, str]:
    j = i % len(order)
    return int(order[j]), split[j]


def sources_by_share(order: np.ndarray, split: list[str], n: int) -> list[tuple[int, str]]:
    """(source, split) of n samples from a few sources (the real clips): each split gets its
    SPLITS share of the samples, round-robin over its own sources. ``sample_source`` gives every
    source the same number of samples, which with three clips, one per split, would put a third
    of the clip samples in test."""
    shares = {name: share for name, share in SPLITS if name in split}
    members = {name: [int(order[j]) for j, s in enumerate(split) if s == name] for name in shares}
    counts = dict.fromkeys(shares, 0)
    picked = []
    for _ in range(n):
        name = min(shares, key=lambda s: (counts[s] + 1) / shares[s])  # the split furthest below its share
        picked.append((members[name][counts[name] % len(members[name])], name))
        counts[name] += 1
    return picked


# ---- video quality -----------------------------------------------------------------------------
def video_mos(distortions: dict[str, int]) -> float:
    """The clip's score from its distortion levels: prod (1 - severity); 1.0 when pristine."""
    return float(np.prod([1.0 - SEVERITY[k][level - 1] for k, level in distortions.items()]))


@dataclass(frozen=True)
class VideoTask:
    index: int
    seed: int
    photo: str  # the source: a photo, or a real clip when ``clip``
    split: str
    out: str
    size: tuple[int, int]  # (W, H)
    frames: int
    fps: int
    clip: bool = False


def plan_distortions(rng: np.random.Generator) -> dict[str, int]:
    """10% pristine, else one (60%) or two (40%) distortion types at uniform levels 1-5."""
    if rng.random() < 0.1:
        return {}
    kinds = rng.choice(sorted(VIDEO_PARAMS), size=1 if rng.random() < 0.6 else 2, replace=False)
    return {str(k): int(rng.integers(1, LEVELS + 1)) for k in kinds}


def camera_move(photo: Image.Image, size: tuple[int, int], frames: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth pan + zoom over the photo: uint8 (T, H, W, 3) frames of ``size`` (W, H)."""
    w, h = photo.size
    aspect = size[0] / size[1]
    full_w = min(w, h * aspect)
    zooms = rng.uniform(1.0, 1.4, size=2)
    ends = []
    for z in zooms:  # a random window of this zoom, anywhere inside the photo
        bw, bh = full_w / z, full_w / aspect / z
        ends.append((rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh))
    (x0, y0, w0, h0), (x1, y1, w1, h1) = ends
    out = np.empty((frames, size[1], size[0], 3), np.uint8)
    for t in range(frames):
        s = t / max(1, frames - 1)
        s = s * s * (3 - 2 * s)  # ease in and out
        bx, by, bw, bh = x0 + s * (x1 - x0), y0 + s * (y1 - y0), w0 + s * (w1 - w0), h0 + s * (h1 - h0)
        out[t] = np.asarray(photo.resize(size, Image.BICUBIC, box=(bx, by, bx + bw, by + bh)))
    return out


@functools.lru_cache(maxsize=8)
def decoded_clip(path: str, size: tuple[int, int]) -> tuple[Image.Image, ...]:
    """Every frame of a clip (PyAV), cached per process (clips with one keyframe cannot be
    seeked cheaply). Frames much larger than ``size`` needs are stored downscaled to 1.5x the
    size that covers it, which bounds memory (about 80 MB for bigbuckbunny's 132 720p frames at
    224x224); decoding and scaling are deterministic like the rest."""
    import av

    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            scale = 1.5 * max(size[0] / frame.width, size[1] / frame.height)
            if scale < 1.0:  # swscale's area filter: ~free next to decoding, 3x faster than PIL
                frame = frame.reformat(width=max(1, round(frame.width * scale)), height=max(1, round(frame.height * scale)),
                                       format="rgb24", interpolation="AREA")
            frames.append(frame.to_image())
    if not frames:
        raise SynthError(f"{path}: no video frames decoded")
    return tuple(frames)


def clip_window(path: str, size: tuple[int, int], frames: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``frames`` consecutive frames of a real clip from a random start (played back and forth
    when the clip is shorter), through one random crop (zoom 1.0-1.3 of the largest window of
    the output's aspect, maybe mirrored) resized to ``size`` (W, H): uint8 (T, H, W, 3) and the
    start frame."""
    source = decoded_clip(path, tuple(size))
    n = len(source)
    start = int(rng.integers(0, max(1, n - frames + 1)))
    period = max(1, 2 * n - 2)
    idx = [(start + t) % period for t in range(frames)]
    idx = [i if i < n else period - i for i in idx]
    w, h = source[0].size
    aspect = size[0] / size[1]
    full_w = min(w, h * aspect)
    bw = full_w / rng.uniform(1.0, 1.3)
    bh = bw / aspect
    bx, by = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    mirror = rng.random() < 0.5
    out = np.empty((frames, size[1], size[0], 3), np.uint8)
    for t, i in enumerate(idx):
        picture = np.asarray(source[i].resize(tuple(size), Image.BICUBIC, box=(bx, by, bx + bw, by + bh)))
        out[t] = picture[:, ::-1] if mirror else picture
    return out, start


def distort(frames: np.ndarray, distortions: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    """Apply the pixel-domain distortions (compression happens at encoding): uint8 (T, H, W, 3)."""
    x = frames.astype(np.float32)
    level = lambda k: VIDEO_PARAMS[k][distortions[k] - 1]  # noqa: E731
    if "exposure" in distortions:
        x = x * 2.0 ** (level("exposure") * rng.choice([-1.0, 1.0]))
    if "flicker" in distortions:
        x = x * (1.0 + level("flicker") * rng.uniform(-1, 1, size=(len(x), 1, 1, 1))).astype(np.float32)
    if "blur" in distortions:
        x = gaussian_filter(x, sigma=(0, level("blur"), level("blur"), 0), mode="reflect")
    if "noise" in distortions:
        x = x + rng.normal(0, level("noise"), size=x.shape).astype(np.float32)
    if "stutter" in distortions:
        hold = int(level("stutter"))
        x = x[(np.arange(len(x)) // hold) * hold]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def encode_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, crf: int) -> None:
    """H.264 yuv420p at ``crf``; single-threaded and without x264's macroblock-tree rate control
    (mbtree), which gave different bytes for the same frames from run to run, so the bytes are
    reproducible."""
    import av

    with atomic_file(path, private=False) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def make_video(task: VideoTask) -> dict:
    """Render, distort and encode one clip; returns its label row."""
    rng = np.random.default_rng([task.seed, 1, task.index])
    distortions = plan_distortions(rng)
    start = ""
    if task.clip:
        frames, start = clip_window(task.photo, task.size, task.frames, rng)
    else:
        with Image.open(task.photo) as im:
            frames = camera_move(im.convert("RGB"), task.size, task.frames, rng)
    frames = distort(frames, distortions, rng)
    rel = f"clips/{task.index:05d}_{Path(task.photo).stem}.mp4"
    crf = VIDEO_PARAMS["compression"][distortions["compression"] - 1] if "compression" in distortions else CLEAN_CRF
    encode_mp4(Path(task.out) / rel, frames, task.fps, crf)
    return {
        "path": rel,
        "mos": round(video_mos(distortions), 6),
        "source": Path(task.photo).name,
        "split": task.split,
        "distortions": ";".join(f"{k}:{v}" for k, v in sorted(distortions.items())),
        "start": start,  # first frame of the window (clip sources)
    }


def generate_video(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    pristine: str | os.PathLike = DEFAULT_PRISTINE,
    size: tuple[int, int] = (320, 240),
    frames: int = 48,
    fps: int = 24,
    workers: int = -1,
    progress: Callable[[int], None] | None = None,
    clips: str | os.PathLike | None = "auto",
    clip_fraction: float = CLIP_FRACTION,
) -> Path:
    """Write ``n`` clips under ``out/clips`` plus labels.csv (all columns) and
    train/val/test.csv (``path,mos``); returns labels.csv. ``round(clip_fraction * n)`` of the
    samples are windows of the real clips under ``clips`` (see ``source_clips``), the rest pan +
    zoom over photos; each photo and each clip belongs to one split, and each split gets its
    share of the clip samples (``sources_by_share``)."""
    _check_n(n)
    if min(size) < 16 or any(v % 2 for v in size):
        raise SynthError(f"--size must be even and at least 16x16 (H.264 4:2:0), got {size[0]}x{size[1]}")
    if frames < 1 or fps < 1:
        raise SynthError("--frames and --fps must be positive")
    if not 0 <= clip_fraction <= 1:
        raise SynthError(f"--clip-fraction must be in [0, 1], got {clip_fraction}")
    videos, skipped = clips_covering(source_clips(clips, pristine), size)
    for name, why in skipped.items():
        log.warning("--clips: %s left out: %s (its windows would be upscaled)", name, why)
    if skipped and not videos and str(clips).lower() != "auto":
        raise SynthError(f"--clips {clips}: no clip covers --size {size[0]}x{size[1]} ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    n_clip = round(clip_fraction * n) if videos else 0
    from_clip = np.zeros(n, bool)
    from_clip[np.random.default_rng([seed, 4]).permutation(n)[:n_clip]] = True
    photos = pristine_photos(pristine) if n_clip < n else []
    order, split = source_order(len(photos), n - n_clip, seed) if photos else (None, None)
    clip_sources = sources_by_share(*source_order(len(videos), n_clip, seed, stream=1), n_clip) if n_clip else []
    (Path(out) / "clips").mkdir(parents=True, exist_ok=True)
    tasks, k_photo, k_clip = [], 0, 0
    for i in range(n):
        if from_clip[i]:
            j, s = clip_sources[k_clip]
            tasks.append(VideoTask(i, seed, str(videos[j]), s, str(out), tuple(size), frames, fps, clip=True))
            k_clip += 1
        else:
            j, s = sample_source(k_photo, order, split)
            tasks.append(VideoTask(i, seed, str(photos[j]), s, str(out), tuple(size), frames, fps))
            k_photo += 1
    rows = _map(make_video, tasks, workers, progress)
    params = {"kind": "video", "n": n, "seed": seed, "size": list(size), "frames": frames, "fps": fps,
              "clips": [p.name for p in videos], "clips_left_out": skipped, "clip_samples": n_clip,
              "severity": SEVERITY, "params": VIDEO_PARAMS, "clean_crf": CLEAN_CRF}
    return _write_tables(Path(out), rows, ("path", "mos"), params)


# ---- forgery -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForgeryTask:
    index: int
    seed: int
    photo: str
    segments: str
    donor: str  # splice donor photo (ignored for other kinds)
    donor_segments: str
    split: str
    out: str
    authentic_fraction: float
    jpeg: float = 0.5  # probability of JPEG re-compression after the edit


@dataclass
class Forgery:
    """One sample before post-processing: reference and forged uint8 (H, W, 3), mask bool
    (H, W) = exactly the pixels where forged differs from reference."""

    kind: str  # splice | copymove | inpaint | authentic
    reference: np.ndarray
    forged: np.ndarray
    mask: np.ndarray


def pick_region(segments: np.ndarray, rng: np.random.Generator, lo: float = 0.01, hi: float = 0.25) -> np.ndarray:
    """A random segment covering lo..hi of the photo (else the one nearest 10%): bool (H, W)."""
    ids, counts = np.unique(segments, return_counts=True)
    frac = counts / segments.size
    fitting = ids[(frac >= lo) & (frac <= hi)]
    region_id = rng.choice(fitting) if fitting.size else ids[np.argmin(np.abs(frac - 0.1))]
    return segments == region_id


def paste(target: np.ndarray, donor: np.ndarray, region: np.ndarray, rng: np.random.Generator, avoid: bool) -> np.ndarray:
    """Copy ``donor``'s pixels under ``region`` (rescaled 0.7-1.3x, maybe mirrored) to a random
    place in a copy of ``target``. ``avoid``: prefer places off the region's own box (copy-move)."""
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = target.shape[:2]
    scale = min(rng.uniform(0.7, 1.3), 0.9 * h / (y1 - y0), 0.9 * w / (x1 - x0))
    ph, pw = max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale))
    patch = np.asarray(Image.fromarray(donor[y0:y1, x0:x1]).resize((pw, ph), Image.BILINEAR))
    shape = np.asarray(Image.fromarray(region[y0:y1, x0:x1]).resize((pw, ph), Image.NEAREST))
    if rng.random() < 0.5:
        patch, shape = patch[:, ::-1], shape[:, ::-1]
    for _ in range(20):
        ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if not avoid or abs(ty - y0) > ph / 2 or abs(tx - x0) > pw / 2:
            break
    forged = target.copy()
    window = forged[ty : ty + ph, tx : tx + pw]
    window[shape] = patch[shape]
    return forged


def pick_object(segments: np.ndarray, rng: np.random.Generator, lo: float = 0.01, hi: float = 0.12) -> np.ndarray:
    """A random segment covering lo..hi of the photo that does not touch the border (object-like),
    else any segment as ``pick_region`` picks it: bool (H, W)."""
    ids, counts = np.unique(segments, return_counts=True)
    frac = counts / segments.size
    border = np.unique(np.concatenate([segments[0], segments[-1], segments[:, 0], segments[:, -1]]))
    fitting = ids[(frac >= lo) & (frac <= hi) & ~np.isin(ids, border)]
    if not fitting.size:
        return pick_region(segments, rng, lo, hi)
    return segments == rng.choice(fitting)


def inpaint(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Remove ``region`` (grown by 2 px so the object's outline goes too) from a copy of ``image``
    and fill it from its surroundings: scikit-image's biharmonic inpainting (on a crop around the
    hole, downscaled when the hole has over INPAINT_MAX_PIXELS pixels, the fill then upscaled),
    plus grain matching the surroundings' fine texture so the fill is not a flat smear."""
    from skimage.restoration import inpaint_biharmonic

    hole = binary_dilation(region, iterations=2)
    ys, xs = np.nonzero(hole)
    h, w = hole.shape
    pad = 16
    y0, y1, x0, x1 = max(0, ys.min() - pad), min(h, ys.max() + pad + 1), max(0, xs.min() - pad), min(w, xs.max() + pad + 1)
    crop, hole_c = image[y0:y1, x0:x1], hole[y0:y1, x0:x1]
    ch, cw = hole_c.shape
    scale = min(1.0, float(np.sqrt(INPAINT_MAX_PIXELS / hole_c.sum())))
    if scale < 1.0:  # solve on a box-downscaled crop; any pixel touching the hole is unknown there
        small = (max(4, round(cw * scale)), max(4, round(ch * scale)))
        known = np.asarray(Image.fromarray(crop).resize(small, Image.BOX), np.float64) / 255
        hole_s = np.asarray(Image.fromarray(hole_c.astype(np.float32)).resize(small, Image.BOX)) > 0
        filled_s = inpaint_biharmonic(known, hole_s, channel_axis=-1).astype(np.float32)
        fill = np.stack([np.asarray(Image.fromarray(filled_s[..., c], "F").resize((cw, ch), Image.BICUBIC))
                         for c in range(3)], axis=-1) * 255
    else:
        fill = inpaint_biharmonic(crop / 255.0, hole_c, channel_axis=-1).astype(np.float32) * 255
    # grain: the robust (MAD) std of the surroundings' high-pass residual, per channel
    x = crop.astype(np.float32)
    ring = binary_dilation(hole_c, iterations=8) & ~hole_c
    residual = (x - gaussian_filter(x, sigma=(1.5, 1.5, 0)))[ring]
    std = 1.4826 * np.median(np.abs(residual - np.median(residual, axis=0)), axis=0) * rng.uniform(0.8, 1.1)
    noise = 0.8 * rng.standard_normal((ch, cw, 1)) + 0.6 * rng.standard_normal((ch, cw, 3))
    noise = gaussian_filter(noise.astype(np.float32), sigma=(0.6, 0.6, 0))
    noise /= max(float(noise.std()), 1e-6)
    out = image.copy()
    out[y0:y1, x0:x1][hole_c] = np.clip(np.rint(fill + noise * std), 0, 255).astype(np.uint8)[hole_c]
    return out


def make_forgery_sample(task: ForgeryTask, rng: np.random.Generator) -> Forgery:
    """The forgery before post-processing (kind drawn from ``rng``: authentic with probability
    ``authentic_fraction``, else splice / copy-move / inpaint equally)."""
    reference = _rgb(task.photo)
    r = rng.random()
    if r < task.authentic_fraction:
        return Forgery("authentic", reference, reference.copy(), np.zeros(reference.shape[:2], bool))
    u = (r - task.authentic_fraction) / max(1e-12, 1 - task.authentic_fraction)
    kind = FORGERY_KINDS[min(len(FORGERY_KINDS) - 1, int(u * len(FORGERY_KINDS)))]
    if kind == "inpaint":
        forged = inpaint(reference, pick_object(_labels(task.segments), rng), rng)
    else:
        if kind == "splice":
            donor, segments = _rgb(task.donor), _labels(task.donor_segments)
        else:
            donor, segments = reference, _labels(task.segments)
        forged = paste(reference, donor, pick_region(segments, rng), rng, avoid=kind == "copymove")
    mask = np.any(forged != reference, axis=-1)
    return Forgery(kind if mask.any() else "authentic", reference, forged, mask)


def post_process(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 jpeg: float = 0.5) -> tuple[Image.Image, np.ndarray, list[str], int | None]:
    """Random resize (p .25), blur (p .25), JPEG quality 65-95 (p ``jpeg``) of the forged image;
    the mask follows the resize. Returns (image, mask, ops, jpeg quality or None)."""
    img, ops = Image.fromarray(image), []
    if rng.random() < 0.25:
        s = rng.uniform(0.6, 0.9)
        new = (max(1, round(img.width * s)), max(1, round(img.height * s)))
        img = img.resize(new, Image.BICUBIC)
        mask = np.asarray(Image.fromarray(mask).resize(new, Image.NEAREST))
        ops.append(f"resize:{s:.3f}")
    if rng.random() < 0.25:
        sigma = rng.uniform(0.4, 1.2)
        img = img.filter(ImageFilter.GaussianBlur(sigma))
        ops.append(f"blur:{sigma:.2f}")
    quality = int(rng.integers(65, 96)) if rng.random() < jpeg else None
    if quality:
        ops.append(f"jpeg:{quality}")
    return img, mask, ops, quality


def make_forgery(task: ForgeryTask) -> dict:
    """Make, post-process and save one sample; returns its label row."""
    rng = np.random.default_rng([task.seed, 2, task.index])
    sample = make_forgery_sample(task, rng)
    image, mask, ops, quality = post_process(sample.forged, sample.mask, rng, task.jpeg)
    out, stem = Path(task.out), f"{task.index:05d}"
    forged = f"forged/{stem}_{sample.kind}.{'jpg' if quality else 'png'}"
    reference, mask_rel = f"reference/{stem}.png", f"mask/{stem}.png" if sample.kind != "authentic" else ""
    _save(image, out / forged, quality)
    _save(Image.fromarray(sample.reference), out / reference)
    if mask_rel:
        _save(Image.fromarray(mask.astype(np.uint8) * 255), out / mask_rel)
    return {
        "forged": forged,
        "reference": reference,
        "mask": mask_rel,
        "kind": sample.kind,
        "source": Path(task.photo).name,
        "donor": Path(task.donor).name if sample.kind == "splice" else "",
        "post": ";".join(ops),
        "split": task.split,
        "manipulated_fraction": round(float(mask.mean()), 6),
    }


def generate_forgery(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    pristine: str | os.PathLike = DEFAULT_PRISTINE,
    authentic_fraction: float = 0.2,
    workers: int = -1,
    progress: Callable[[int], None] | None = None,
    jpeg: float = 0.5,
) -> Path:
    """Write ``n`` samples under ``out/{forged,reference,mask}`` plus labels.csv (all columns)
    and train/val/test.csv (``forged,reference,mask``); returns labels.csv. ``jpeg``: the
    probability that a forged or authentic image is JPEG re-compressed (1 = always)."""
    _check_n(n)
    if not 0 <= authentic_fraction <= 1:
        raise SynthError(f"--authentic must be in [0, 1], got {authentic_fraction}")
    if not 0 <= jpeg <= 1:
        raise SynthError(f"--jpeg must be a probability in [0, 1], got {jpeg}")
    photos = segmented_photos(pristine)
    order, split = source_order(len(photos), n, seed)
    for sub in ("forged", "reference", "mask"):
        (Path(out) / sub).mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(n):
        j, s = sample_source(i, order, split)
        pool = [int(k) for k, ks in zip(order, split) if ks == s and k != j] or [j]
        d = pool[int(np.random.default_rng([seed, 3, i]).integers(len(pool)))]
        tasks.append(ForgeryTask(i, seed, str(photos[j][0]), str(photos[j][1]), str(photos[d][0]), str(photos[d][1]),
                                 s, str(out), authentic_fraction, jpeg))
    rows = _map(make_forgery, tasks, workers, progress)
    params = {"kind": "forgery", "n": n, "seed": seed, "authentic_fraction": authentic_fraction,
              "forged_kinds": list(FORGERY_KINDS), "jpeg": jpeg, "resize": 0.25, "blur": 0.25}
    return _write_tables(Path(out), rows, ("forged", "reference", "mask"), params)


# ---- shared ------------------------------------------------------------------------------------
def _check_n(n: int) -> None:
    if n < 1:
        raise SynthError(f"--n must be at least 1, got {n}")


def _map(fn: Callable[[object], dict], tasks: list, workers: int, progress: Callable[[int], None] | None) -> list[dict]:
    """``fn`` over ``tasks`` in order, in a process pool unless ``workers`` is 0 or 1."""
    workers = (os.cpu_count() or 1) if workers < 0 else workers
    if workers <= 1 or len(tasks) == 1:
        return [_tick(fn(task), progress) for task in tasks]
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        return [_tick(row, progress) for row in pool.imap(fn, tasks)]


def _tick(row: dict, progress: Callable[[int], None] | None) -> dict:
    if progress is not None:
        progress(1)
    return row


def _write_tables(out: Path, rows: list[dict], keep: tuple[str, ...], params: dict) -> Path:
    """labels.csv with every column; train/val/test.csv with the columns ``qscore train`` reads."""
    _csv(out / "labels.csv", rows, list(rows[0]))
    for name, _ in SPLITS:
        _csv(out / f"{name}.csv", [r for r in rows if r["split"] == name], list(keep))
    (out / "synth.json").write_text(json.dumps({**params, "qscore_version": __version__}, indent=1) + "\n")
    return out / "labels.csv"


def _csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _labels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _save(image: Image.Image, path: Path, quality: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if quality:
        image.save(path, quality=quality)
    else:
        image.save(path)

