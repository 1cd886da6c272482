"""CLiF-VQA throughput on the GPU: videos/s and peak GPU memory at the default preset.

What it measures, per resolution (synthetic 10 s H.264 clips made with PyAV, 720p and 1080p) and
per variant (``mixed`` and ``decoupled``), random weights (the cost does not depend on them):
- ``bare``: forward only, one pre-decoded batch on the device (8 frames x 3x3 windows of
  224 px per video through ViT-B/16, plus the fragment backbone and head);
- ``runner``: end to end through the runner (decode in workers, copy, forward, heatmap PNG and
  Parquet writes), with its decode / stage / model split;
each twice: with the heatmap PNG and with ``heatmap=false`` (what the full-size overlay costs).

Call (GPU machine, repository root):

    python benchmarks/clifvqa.py --out results/ [--n 32] [--batch-size 8] [--workers -1]
        [--resolutions video720,video1080] [--variants mixed,decoupled]

Writes ``<out>/clifvqa.json``: a list of ``qscore.bench.bench`` results with ``resolution``,
``variant`` and ``heatmap`` added, and prints it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=32, help="synthetic clips per resolution")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--repeats", type=int, default=10, help="timed bare-forward batches")
    parser.add_argument("--resolutions", default="video720,video1080")
    parser.add_argument("--variants", default="mixed,decoupled")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    from qscore.bench import bench, synthesize
    from qscore.runner import RunConfig

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.resolutions.split(","):
            files = synthesize(kind, args.n, Path(tmp) / kind)
            for variant in args.variants.split(","):
                for heatmap in (True, False):
                    cfg = RunConfig(
                        task="video", model="clifvqa", inputs=files, preset="default", weights="random",
                        overrides={"variant": variant, "heatmap": heatmap}, device=args.device,
                        batch_size=args.batch_size, workers=args.workers,
                    )
                    result = bench(cfg, files, args.repeats)
                    result.update(resolution=kind, variant=variant, heatmap=heatmap)
                    results.append(result)
                    print(json.dumps(result), flush=True)
                    torch.cuda.empty_cache()
    (args.out / "clifvqa.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
