"""CPU decoding per video: this checkout's reader against an older qscore source (issue 17).

    python benchmarks/decode_cpu.py CLIPS [--make 720:50,720:250] [--baseline SRC] [--procs N] [--json F]

``--make`` first writes 16 clips per ``HEIGHT:GOP`` into CLIPS/HEIGHTp-gGOP/ with
``qscore.bench.synthesize`` (10 s, 25 fps H.264; GOP 50: a keyframe every 2 s, as phones and
uploads have; 250: one keyframe). Then the models' own preparers (decode + sampling, as in a
runner worker: one process each, one decode thread, torch on one thread) run over every clip:
Q-CLIP's 8 uniform frames at 336² (frame_slack 1, its default, and 0: exact), MVQA's 32 frames
2 apart, CLiF-VQA's 8 frames at native size. Each set runs in ``--procs`` processes at once
(default: every usable core, like ``--workers -1``), and reports videos/s and the mean CPU ms per
video (on a shared machine the steadier of the two: all cores busy, videos/s = cores / CPU s). ``--baseline SRC`` measures the same with that qscore source in a subprocess (make it
with ``mkdir /tmp/base && git archive COMMIT src | tar -x -C /tmp/base``, then pass
/tmp/base/src), so both readers see the same clips and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPEATS = 2  # passes over the clips per measurement; videos/s is over all of them


def preparers() -> dict:
    """name -> a model's preparer with its default sampling (constructed directly: no model)."""
    from qscore.models.clifvqa import CLiFVQAPrepare
    from qscore.models.mvqa import USDSPreparer
    from qscore.models.qclip import QCLIPPrepare

    clif = dict(frames=8, sampler="uniform", slack=1, window=224, grid=(3, 3), whole=False, fragment_grid=7,
                fragment_patch=32, keep_frame=False, max_side=3840, seed=0)
    return {
        "qclip 8 uniform, slack 1": QCLIPPrepare(8, 336, "uniform", 1),
        "qclip 8 uniform, exact": QCLIPPrepare(8, 336, "uniform", 0),
        "mvqa 32 x 2": USDSPreparer(32, 2, 1, 7, 32, 0),
        "clifvqa 8 uniform": CLiFVQAPrepare(**clif),
    }


def _start() -> None:
    """A worker process: torch on one thread (as DataLoader workers), the models imported."""
    import torch

    torch.set_num_threads(1)
    preparers()


def _one(task: tuple[str, object]) -> float:
    """CPU seconds of one preparer call on one item (the process's own clock)."""
    name, item = task
    prepare = preparers()[name]
    t0 = time.process_time()
    prepare(item)
    return time.process_time() - t0


def measure(folder: Path, name: str, procs: int) -> tuple[float, float]:
    """(videos/s, mean CPU ms per video) of preparer ``name`` over the clips in ``folder``."""
    from qscore.media.discover import discover

    tasks = [(name, it) for it in discover([str(folder)], "video")] * REPEATS
    with ProcessPoolExecutor(procs, initializer=_start) as pool:
        list(pool.map(_one, tasks[:procs]))  # every process started and warm
        t0 = time.perf_counter()
        cpu = list(pool.map(_one, tasks))
        wall = time.perf_counter() - t0
    return round(len(tasks) / wall, 2), round(1e3 * sum(cpu) / len(cpu), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("clips", type=Path)
    p.add_argument("--make", default="", help="HEIGHT:GOP,... clip sets to write first (720 or 1080)")
    p.add_argument("--baseline", type=Path, help="an older qscore source folder (holding qscore/) to compare with")
    p.add_argument("--procs", type=int, default=0, help="processes at once (default: every usable core)")
    p.add_argument("--only", default="", help="measure only the preparers whose name holds this")
    p.add_argument("--rounds", type=int, default=2, help="measurements per set and reader (the best counts)")
    p.add_argument("--json", type=Path)
    p.add_argument("--measure-only", metavar="PREPARER", help=argparse.SUPPRESS)  # a subprocess: one set
    args = p.parse_args()
    from qscore.cpus import usable_cpus

    procs = args.procs or usable_cpus()
    if args.measure_only:
        print(json.dumps(measure(args.clips, args.measure_only, procs)))
        return
    from qscore.bench import synthesize

    for spec in filter(None, args.make.split(",")):
        height, gop = spec.split(":")
        synthesize(f"video{height}", 16, args.clips / f"{height}p-g{gop}", gop=int(gop))
    sources = {"new": os.environ.get("PYTHONPATH", "")}
    if args.baseline:
        sources = {"baseline": str(args.baseline), **sources}
    results: dict = {}
    print(f"{procs} processes; best of {args.rounds} rounds, the readers alternating; videos/s (CPU ms per video)")
    for folder in sorted(p for p in args.clips.iterdir() if p.is_dir()):
        for name in (n for n in preparers() if args.only in n):
            best: dict = {}
            for _ in range(args.rounds):  # alternate, so a neighbour's load hits both alike
                for label, path in sources.items():
                    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
                    cmd = [sys.executable, __file__, str(folder), "--procs", str(procs), "--measure-only", name]
                    got = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
                    best[label] = max(best.get(label, got), got, key=lambda r: r[0])
            results.setdefault(folder.name, {})[name] = best
            line = f"{folder.name:12s} {name:26s} " + "  ".join(f"{k} {v[0]:7.2f} ({v[1]:6.1f})" for k, v in best.items())
            if "baseline" in best:
                line += f"  speed-up {best['new'][0] / best['baseline'][0]:.2f}x (CPU {best['baseline'][1] / best['new'][1]:.2f}x)"
            print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"procs": procs, "results": results}, indent=1))


if __name__ == "__main__":
    main()
