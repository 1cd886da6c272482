"""Q-CLIP throughput on the GPU: default preset (PE-Core-L/14-336), random weights.

What it measures (the cost does not depend on the weights):
- ``decode``: the preparer alone on one CPU core, ms per 720p video (8 frames decoded straight
  at 336x336; the authors' decode + PIL resize took 213 ms);
- ``bare``: the model's forward on pre-decoded, device-resident uint8 batches of 8 frames per
  video, bf16 autocast under inference mode (what the runner does), for batch sizes 1..16:
  videos/s, ms per batch, peak GPU memory; plus fp32 at batch 8 (the authors' 12.2 videos/s);
  with ``--compile`` the same sweep again with the vision tower under ``torch.compile``;
- ``runner``: end to end through ``qscore.runner`` (``qscore.bench.bench``: decode in workers,
  copy, forward, Parquet), per sampler.
The bars (spec "Speed to beat", H100): model alone >= 160 videos/s; end to end >= 10 x 7.0.

Clips: ``qscore.bench.synthesize("video720", n)`` (synthetic 720p H.264 made with PyAV; 10 s,
where the authors used 8 s: 8 frames are decoded either way).

Call (GPU machine, repository root):

    python benchmarks/qclip.py --out results/ [--n 24] [--batch-sizes 1,2,4,8,16]
        [--runner-batch 16] [--workers -1] [--samplers uniform,framediff] [--compile]

Writes ``<out>/qclip.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

AUTHORS_END_TO_END = 7.0  # videos/s, their evaluation loop on the same kind of clips
BAR_MODEL, BAR_END_TO_END = 160.0, 10 * AUTHORS_END_TO_END


def sweep(model, samples, batch_sizes, repeats: int, device: torch.device, autocast: bool) -> list[dict[str, Any]]:
    """Forward-only throughput per batch size on one pre-copied batch (repeated samples)."""
    rows = []
    for bs in batch_sizes:
        chosen = [samples[i % len(samples)] for i in range(bs)]
        batch = {k: v.to(device) for k, v in model.collate(chosen).items()}

        def step() -> None:
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                model(batch)["score"].float().cpu()  # the runner's sync

        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        rows.append({
            "batch_size": bs,
            "videos_per_s": round(bs * repeats / elapsed, 2),
            "ms_per_batch": round(elapsed / repeats * 1e3, 2),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
        })
        print(json.dumps({"bf16" if autocast else "fp32": rows[-1]}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=24, help="synthetic 720p clips")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per batch size")
    parser.add_argument("--runner-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--samplers", default="uniform,framediff")
    parser.add_argument("--compile", action="store_true", help="also sweep with torch.compile on the vision tower")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    from qscore.bench import bench, synthesize
    from qscore.media.discover import discover
    from qscore.config import RunConfig, build_model, pick_device

    device = pick_device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": "qclip", "preset": "default", "weights": "random",
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "bars": {"model_videos_per_s": BAR_MODEL, "end_to_end_videos_per_s": BAR_END_TO_END},
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = synthesize("video720", args.n, Path(tmp) / "video720")
        cfg = RunConfig(task="video", model="qclip", inputs=files, preset="default", weights="random",
                        device=args.device, batch_size=args.runner_batch, workers=args.workers)
        model, _, _ = build_model(cfg, device)
        prepare = model.preparer()
        items = discover(files, "video", None)
        t0 = time.perf_counter()
        samples = [prepare(it) for it in items]
        result["decode_ms_per_video"] = round((time.perf_counter() - t0) / len(items) * 1e3, 1)

        result["bare_bf16"] = sweep(model, samples, batch_sizes, args.repeats, device, autocast=True)
        result["bare_fp32_batch8"] = sweep(model, samples, [8], max(2, args.repeats // 3), device, autocast=False)[0]
        if args.compile:
            t0 = time.perf_counter()
            model.clip.visual.compile(dynamic=False)
            result["bare_bf16_compiled"] = sweep(model, samples, batch_sizes, args.repeats, device, autocast=True)
            result["compile_and_sweep_s"] = round(time.perf_counter() - t0, 1)
        best = max(r["videos_per_s"] for r in result["bare_bf16"])
        del model, samples
        torch.cuda.empty_cache()

        result["runner"] = []
        for sampler in args.samplers.split(","):
            cfg.overrides = {"sampler": sampler}
            run = bench(cfg, files, args.repeats)
            run["sampler"] = sampler
            run["x_authors_loop"] = round((run["runner"]["files_per_s"] or 0) / AUTHORS_END_TO_END, 2)
            result["runner"].append(run)
            print(json.dumps({"runner": run}), flush=True)
            torch.cuda.empty_cache()
    result["meets_model_bar"] = best >= BAR_MODEL
    result["meets_end_to_end_bar"] = any((r["runner"]["files_per_s"] or 0) >= BAR_END_TO_END for r in result["runner"])
    text = json.dumps(result, indent=2)
    (args.out / "qclip.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
