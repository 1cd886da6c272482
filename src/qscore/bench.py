"""`qscore bench`: how fast a model scores, end to end through the runner and as a bare forward.

The bare forward runs on samples decoded once up front (no decoding, no copies in the loop), so
``runner / bare`` is the runner's overhead. Both use the same model, preset, batch and device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qscore import registry
from qscore.media.discover import discover
from qscore.config import RunConfig, build_model, pick_device
from qscore.runner import run
from qscore.types import Item


def synthesize(kind: str, n: int, folder: Path, seed: int = 0) -> list[str]:
    """Benchmark inputs: ``image512`` JPEGs (smooth random textures) or ``video720``/``video1080``
    10 s H.264 clips at 25 fps with moving content, made with PyAV."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "image512":
        from PIL import Image

        rng, paths = np.random.default_rng(seed), []
        for i in range(n):
            base = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((512, 512), Image.BICUBIC)
            p = folder / f"img{i:04d}.jpg"
            img.save(p, quality=90)
            paths.append(str(p))
        return paths
    if kind not in ("video720", "video1080"):
        raise ValueError(f"unknown synthetic kind {kind!r}: image512, video720 or video1080")
    paths = [str(folder / f"clip{i:03d}.mp4") for i in range(n)]
    with ProcessPoolExecutor(min(n, os.cpu_count() or 1) or 1) as pool:  # one encoder per core
        list(pool.map(functools.partial(_write_clip, kind=kind, seed=seed), range(n), paths))
    return paths


def _write_clip(index: int, path: str, kind: str, seed: int) -> None:
    """One 10 s, 25 fps H.264 clip: a random 8x8-block texture panning sideways."""
    import av

    h, w = (720, 1280) if kind == "video720" else (1080, 1920)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8 + 8, w // 8 + 80, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "threads": "1"}
        for t in range(250):
            dx = (t * 2 + index * 8) % 640
            frame = np.ascontiguousarray(base[:h, dx : dx + w])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def bare_forward(cfg: RunConfig, items: list[Item], repeats: int = 10) -> dict[str, Any]:
    """Forward-only throughput on one pre-decoded, pre-copied batch (the upper bound)."""
    device = pick_device(cfg.device)
    model, _, _ = build_model(cfg, device)
    prepare = model.preparer()
    samples = [prepare(it) for it in items[: cfg.batch_size]]
    while len(samples) < cfg.batch_size:  # fewer files than the batch: repeat them
        samples.append(samples[len(samples) % len(items)])
    batch = {k: v.to(device) for k, v in model.collate(samples).items()}
    autocast = device.type == "cuda"

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            out = model(batch)
        out["score"].float().cpu()  # the same sync the runner does

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    return {
        "files_per_s": round(cfg.batch_size * repeats / elapsed, 3),
        "ms_per_batch": round(elapsed / repeats * 1e3, 3),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    }


def bench(cfg: RunConfig, files: list[str], repeats: int = 10, warmup: int | None = None) -> dict[str, Any]:
    """The runner's untimed first pass over ``warmup`` files (None: all of them, filling caches),
    the bare forward, then the runner's timed pass over ``files`` (forced, fresh output)."""
    items = discover(files, cfg.task, cfg.exts)
    result: dict[str, Any] = {
        "model": cfg.model,
        "preset": cfg.preset,
        "batch_size": cfg.batch_size,
        "workers": cfg.workers,
        "files": len(items),
        "warmup_files": warmup,  # None: all
        "device": torch.cuda.get_device_name() if pick_device(cfg.device).type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out, cfg.force, cfg.quiet = Path(tmp), True, True
        if warmup != 0:
            run(dataclasses.replace(cfg, max_files=warmup))  # worker start, cuDNN autotune, caches
        # after the warm-up, so both sides see the same caches (RSFIQA's regions)
        result["bare"] = bare_forward(cfg, items, repeats)
        run(cfg)
        summary = json.loads(next(Path(tmp).glob("*.summary.json")).read_text())
    result["runner"] = {k: summary.get(k) for k in ("files_per_s", "peak_gpu_mb", "ok", "error", "gpu_busy", "decode_ms_mean", "model_ms_mean", "stage_ms_mean", "batch_size", "startup_s", "drain_s")}
    bare, end = result["bare"]["files_per_s"], result["runner"]["files_per_s"] or 0.0
    result["runner_vs_bare"] = round(end / bare, 3) if bare else None
    return result


def task_of(model: str) -> str:
    return registry.get(model).spec.task
