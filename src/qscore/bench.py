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
from qscore.runner import EXIT_USAGE, run
from qscore.types import Item, UsageError


def synthesize(kind: str, n: int, folder: Path, seed: int = 0, gop: int = 250) -> list[str]:
    """Benchmark inputs: ``image512`` JPEGs (smooth random textures) or ``video720``/``video1080``
    10 s H.264 clips at 25 fps with moving content, made with PyAV, a keyframe every ``gop``
    frames (250: one per clip; 25-50, a keyframe every 1-2 s, is what phones and uploads have)."""
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
        list(pool.map(functools.partial(_write_clip, kind=kind, seed=seed, gop=gop), range(n), paths))
    return paths


def _write_clip(index: int, path: str, kind: str, seed: int, gop: int = 250) -> None:
    """One 10 s, 25 fps H.264 clip: a random 8x8-block texture panning sideways."""
    import av

    h, w = (720, 1280) if kind == "video720" else (1080, 1920)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8 + 8, w // 8 + 80, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "threads": "1", "g": str(gop)}
        for t in range(250):
            dx = (t * 2 + index * 8) % 640
            frame = np.ascontiguousarray(base[:h, dx : dx + w])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def bare_forward(cfg: RunConfig, items: list[Item], built: tuple, repeats: int = 10) -> dict[str, Any]:
    """Forward-only throughput on one pre-decoded, pre-copied batch (the upper bound)."""
    device = pick_device(cfg.device)
    model = built[0]
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


RUNNER_KEYS = ("decoder", "files_per_s", "peak_gpu_mb", "ok", "error", "gpu_busy", "decode_ms_mean", "model_ms_mean",
               "stage_ms_mean", "batch_size", "startup_s", "drain_s")


def bench(
    cfg: RunConfig, sets: dict[str, list[str]], decoders: list[str] | None = None, repeats: int = 10,
    warmup: int | None = None,
) -> list[dict[str, Any]]:
    """One row per input set (name -> files) and video decoder, the model built once: the
    runner's untimed first pass over ``warmup`` files of the first set (None: all of them,
    filling caches such as RSFIQA's regions; 0: none), then per set the bare forward (after the
    warm-up, so both sides see the same caches) and the runner's timed pass (forced, fresh
    output) per decoder. ``decoders`` default: the config's."""
    device = pick_device(cfg.device)
    built = build_model(cfg, device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for number, (name, files) in enumerate(sets.items()):
            items = discover(files, cfg.task, cfg.exts)
            base = dataclasses.replace(cfg, inputs=list(files), out=Path(tmp), force=True, quiet=True)
            if number == 0 and warmup != 0:
                run(dataclasses.replace(base, max_files=warmup), built)  # worker start, cuDNN autotune, caches
            bare = bare_forward(base, items, built, repeats)
            for decoder in decoders or [cfg.decoder]:
                if run(dataclasses.replace(base, decoder=decoder), built) == EXIT_USAGE:
                    raise UsageError(f"{cfg.model} on {name} with --decoder {decoder}: see the log above")
                summary = json.loads(next(Path(tmp).glob("*.summary.json")).read_text())
                runner = {k: summary.get(k) for k in RUNNER_KEYS}
                end = runner["files_per_s"] or 0.0
                rows.append({
                    "model": cfg.model, "preset": cfg.preset, "inputs": name, "batch_size": cfg.batch_size,
                    "workers": cfg.workers, "files": len(items), "warmup_files": warmup if number == 0 else 0,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "bare": bare, "runner": runner,
                    "runner_vs_bare": round(end / bare["files_per_s"], 3) if bare["files_per_s"] else None,
                })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with the steady state: files / (timed loop - startup -
    drain). Only meaningful when a run holds many chunks per worker: decoding done before the
    first forward counts in startup."""
    head = "| model | inputs | decoder | files | batch | bare files/s | runner files/s | runner / bare | GPU busy | decode ms/file | startup s / drain s | steady files/s | peak MiB |"
    lines = [head, "|---" * 13 + "|"]
    for r in rows:
        run_ = r["runner"]
        loop = r["files"] / run_["files_per_s"] if run_["files_per_s"] else None  # the timed loop, s
        steady = r["files"] / (loop - run_["startup_s"] - run_["drain_s"]) if loop and run_["startup_s"] is not None else None
        lines.append(
            f"| {r['model']} {r['preset'] or 'default'} | {r['inputs']} | {run_['decoder']} | {r['files']} | {r['batch_size']} "
            f"| {r['bare']['files_per_s']:.1f} | {run_['files_per_s']} | {r['runner_vs_bare']} | {run_['gpu_busy']} "
            f"| {run_['decode_ms_mean']} | {run_['startup_s']} / {run_['drain_s']} | {steady and round(steady, 1)} | {run_['peak_gpu_mb']} |"
        )
    return "\n".join(lines)


def task_of(model: str) -> str:
    return registry.get(model).spec.task
