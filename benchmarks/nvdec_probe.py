"""What bounds GPU decoding (issue 17): Q-CLIP's preparer (8 uniform frames at 336², its
default sampler) with the NVDEC reader in P processes at once, each with its own CUDA context
and NVDEC session, as the runner's GPU-decoding workers; NVDEC and SM utilisation sampled by
nvidia-smi meanwhile. Also, in one process: one file's time split into open + index (PyAV),
NVDEC session (re)configuration, frame fetch and conversion, and a full sequential NVDEC decode.

    python benchmarks/nvdec_probe.py CLIPS [--procs 1,4,8,16] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import time
from pathlib import Path


def _worker(paths: list[str], start, done) -> None:
    import torch

    from qscore.media import video
    from qscore.models.qclip import QCLIPPrepare
    from qscore.types import Item

    video.configure("gpu", 1)
    prepare = QCLIPPrepare(8, 336, "uniform", 1)
    torch.zeros(1, device="cuda")
    prepare(Item(path=paths[0], rel_path="warm", size=0, mtime=0.0))  # CUDA context and NVDEC session
    torch.cuda.synchronize()
    start.wait()
    t0 = time.perf_counter()
    for p in paths:
        prepare(Item(path=p, rel_path=Path(p).name, size=0, mtime=0.0))
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


def parallel(paths: list[str], procs: int, worker=_worker) -> dict:
    """``worker(share, start, done)`` in ``procs`` spawned processes, timed from a common start."""
    ctx = mp.get_context("spawn")
    start, done = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [paths[i::procs] for i in range(procs)]
    workers = [ctx.Process(target=worker, args=(s, start, done)) for s in shares]
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


def split(path: str) -> dict:
    """One file's time, by stage, in this process (warm session)."""
    import PyNvVideoCodec as nvc
    import torch

    from qscore.media import nvdec
    from qscore.media.sampling import uniform_indices

    dev = torch.device("cuda", 0)
    out = {}
    for rep in range(2):  # the second pass is warm
        t = time.perf_counter()
        reader = nvdec.NvdecReader(path, device=dev)
        t_open = time.perf_counter()
        decoder = nvdec._decoder(path, dev)
        t_cfg = time.perf_counter()
        idx = uniform_indices(reader.n_frames, 8)
        frames = decoder.get_batch_frames_by_index(idx)
        torch.cuda.synchronize()
        t_fetch = time.perf_counter()
        rgb = [reader._to_rgb(torch.from_dlpack(f).to(dev), (336, 336)) for f in frames]
        torch.cuda.synchronize()
        t_rgb = time.perf_counter()
        reader.close()
        out = {"open_index_ms": 1e3 * (t_open - t), "session_ms": 1e3 * (t_cfg - t_open),
               "fetch_8_ms": 1e3 * (t_fetch - t_cfg), "convert_8_ms": 1e3 * (t_rgb - t_fetch), "n_frames": reader.n_frames}
    full = nvc.SimpleDecoder(path, gpu_id=0, use_device_memory=True, output_color_type=nvc.OutputColorType.NATIVE)
    t = time.perf_counter()
    n = sum(len(full.get_batch_frames(32)) for _ in range(0, len(full), 32))
    torch.cuda.synchronize()
    out["full_decode_fps_one_session"] = n / (time.perf_counter() - t)
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("clips", type=Path)
    p.add_argument("--procs", default="1,4,8,16")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    paths = sorted(str(f) for f in a.clips.rglob("*.mp4"))
    try:
        result = {"clips": str(a.clips), "split": split(paths[0]), "parallel": []}
    except Exception as e:  # noqa: BLE001 - the parallel figures matter more
        result = {"clips": str(a.clips), "split": repr(e), "parallel": []}
    print("one file:", result["split"], flush=True)
    for procs in (int(x) for x in a.procs.split(",")):
        row = parallel(paths, procs)
        print(row, flush=True)
        result["parallel"].append(row)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
