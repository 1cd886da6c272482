"""What bounds GPU decoding (issue 17): Q-CLIP's preparer (8 uniform frames at 336², its
default sampler, frame_slack 1) with the NVDEC reader, in T threads of one process (one CUDA
context, each thread its own NVDEC session: the runner's way) and in P processes (each its own
context, the runner's way before), nvidia-smi sampling NVDEC and SM utilisation meanwhile. First,
on a few files: the frames against the CPU decoder's, and one file's time split into open +
index (PyAV) and NVDEC decode + conversion, with the packets fed.

    python benchmarks/nvdec_probe.py CLIPS [--make N] [--threads 8,16] [--procs 8,16] [--json F]

``--make N`` first writes N distinct 10 s 720p clips with a keyframe every 2 s under CLIPS, each
hard-linked 4 times (4N files).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import threading
import time
from pathlib import Path

SIZE = (336, 336)


def _prepare():
    """Q-CLIP's default preparer, with this process decoding on NVDEC."""
    from qscore.media import video
    from qscore.models.qclip import QCLIPPrepare

    video.configure("gpu", 1)
    return QCLIPPrepare(8, SIZE[0], "uniform", 1)


def _item(path: str):
    from qscore.types import Item

    return Item(path=path, rel_path=Path(path).name, size=0, mtime=0.0)


def _worker(paths: list[str], start, done) -> None:
    import torch

    prepare = _prepare()
    torch.zeros(1, device="cuda")
    prepare(_item(paths[0]))  # CUDA context and NVDEC session
    torch.cuda.synchronize()
    start.wait()
    t0 = time.perf_counter()
    for p in paths:
        prepare(_item(p))
    torch.cuda.synchronize()
    done.put(time.perf_counter() - t0)


def gpu_sampler() -> subprocess.Popen:
    """nvidia-smi sampling NVDEC and SM utilisation every 200 ms until ``utilisation`` stops it."""
    return subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.decoder,utilization.gpu", "--format=csv,noheader,nounits",
                             "-lms", "200"], stdout=subprocess.PIPE, text=True)


def utilisation(smi: subprocess.Popen) -> dict:
    """Stop ``gpu_sampler``'s nvidia-smi; the mean and peak of its samples (first and last left out)."""
    smi.terminate()
    samples = [tuple(int(v) for v in line.split(",")) for line in smi.stdout.read().splitlines() if line.strip()]
    dec = [s[0] for s in samples[1:-1]] or [0]
    sm = [s[1] for s in samples[1:-1]] or [0]
    return {"nvdec_util_mean": round(sum(dec) / len(dec), 1), "nvdec_util_max": max(dec),
            "sm_util_mean": round(sum(sm) / len(sm), 1)}


def parallel(paths: list[str], procs: int) -> dict:
    """``_worker`` in ``procs`` spawned processes, timed from a common start."""
    ctx = mp.get_context("spawn")
    start, done = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [paths[i::procs] for i in range(procs)]
    workers = [ctx.Process(target=_worker, args=(s, start, done)) for s in shares]
    for w in workers:
        w.start()
    start.wait()
    smi = gpu_sampler()
    t0 = time.perf_counter()
    times = [done.get() for _ in workers]
    wall = time.perf_counter() - t0
    util = utilisation(smi)
    for w in workers:
        w.join()
    return {"procs": procs, "files": len(paths), "videos_per_s": round(len(paths) / wall, 2),
            "ms_per_file_in_a_process": round(1e3 * max(times) / max(len(s) for s in shares), 1), **util}


def threads(paths: list[str], n: int) -> dict:
    """``n`` threads of this process, each preparing its share on its own NVDEC session."""
    import torch

    prepare = _prepare()

    def run(share: list[str]) -> None:
        for p in share:
            prepare(_item(p))

    warm = [threading.Thread(target=run, args=(paths[:1],)) for _ in range(n)]  # a session per thread
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    torch.cuda.synchronize()
    pool = [threading.Thread(target=run, args=(paths[i::n],)) for i in range(n)]
    smi, t0 = gpu_sampler(), time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"threads": n, "files": len(paths), "videos_per_s": round(len(paths) / wall, 2), **utilisation(smi)}


def check(paths: list[str]) -> dict:
    """On each file: Q-CLIP's positions through NVDEC against the CPU decoder (served positions,
    mean |diff| of the RGB frames), the packets fed, and the time split (warm: the file's second pass)."""
    import numpy as np
    import torch

    from qscore.media import nvdec
    from qscore.media.sampling import uniform_indices
    from qscore.media.video import VideoReader, plan_near

    rows = []
    for path in paths:
        for rep in range(2):
            t0 = time.perf_counter()
            gpu = nvdec.NvdecReader(path)
            t1 = time.perf_counter()
            want = uniform_indices(gpu.n_frames, 8)
            frames, used = gpu.frames_near(want, size=SIZE, near=1)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if rep == 0:
                gpu.close()
        served = sorted(set(plan_near(want, gpu._index.refs, 1).values())) if gpu._index.refs else want
        with VideoReader(path) as cpu:
            cpu_frames, cpu_used = cpu.frames_near(want, size=SIZE, near=1)
        rows.append({"file": Path(path).name, "decoder": gpu.decoder, "warnings": gpu.facts()["decode_warnings"],
                     "same_positions": used == cpu_used, "n_frames": gpu.n_frames,
                     "packets_fed": len(nvdec.packets_to_feed(gpu._index, served)),
                     "mean_abs_diff": round(float(np.abs(frames.cpu().numpy().astype(float) - cpu_frames).mean()), 3),
                     "open_index_ms": round(1e3 * (t1 - t0), 1), "decode_convert_ms": round(1e3 * (t2 - t1), 1)})
        gpu.close()
    return {"files": rows}


def make_clips(folder: Path, n: int) -> None:
    from qscore.bench import synthesize

    made = synthesize("video720", n, folder / "distinct", gop=50)  # one process per core
    for k in range(4):
        for i, path in enumerate(made):
            (folder / f"c{k}_{i:02d}.mp4").hardlink_to(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("clips", type=Path)
    p.add_argument("--make", type=int, default=0)
    p.add_argument("--threads", default="8,16")
    p.add_argument("--procs", default="8,16")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.make:
        make_clips(a.clips, a.make)
    paths = sorted(str(f) for f in a.clips.glob("c*.mp4")) or sorted(str(f) for f in a.clips.rglob("*.mp4"))
    result: dict = {"clips": str(a.clips)}
    steps = [("check", lambda: check(paths[:4]))]
    steps += [(f"threads_{t}", lambda t=t: threads(paths, int(t))) for t in a.threads.split(",") if t]
    steps += [(f"procs_{n}", lambda n=n: parallel(paths, int(n))) for n in a.procs.split(",") if n]
    for name, step in steps:
        try:
            result[name] = step()
        except Exception as e:  # noqa: BLE001 - a probe: report and go on
            result[name] = f"{type(e).__name__}: {e}"
        print(name, result[name], flush=True)
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
