"""Can NVDEC skip what the CPU decoder skips? (issue 17) PyNvVideoCodec's indexed access decodes
every frame from the keyframe on (~150 for Q-CLIP's 8 of a 250-frame 2 s-GOP clip); the CPU path
decodes only the reference frames up to each wanted one. This feeds PyNvVideoCodec's low-level
decoder the packets of its own demuxer one at a time, in zero-latency mode (a packet's picture
comes back as soon as it is decoded, in decode order), and leaves out every packet a wanted frame
does not depend on: non-reference frames other than the wanted ones, the rest of a GOP once its
wanted frames are out, GOPs with none. Positions and reference flags come from qscore's packet
index (PyAV), as on the CPU path.

Checks each frame against the CPU decoder (mean |diff| of the 336² RGB frames), then times Q-CLIP's
default positions (8 uniform, frame_slack 1) per file in one process, in P processes, and in T
threads of one process (one CUDA context), nvidia-smi sampling NVDEC meanwhile.

    python benchmarks/nvdec_sparse.py CLIPS [--make 16] [--procs 8,16] [--threads 4] [--json F]

``--make N`` first writes N distinct 10 s 720p clips with a keyframe every 2 s under CLIPS, each
hard-linked 4 times (4N files).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from nvdec_probe import gpu_sampler, parallel, utilisation

SIZE = (336, 336)


def qclip_positions(path: str) -> tuple[object, list[int]]:
    """(CPU reader, Q-CLIP's default positions): 8 uniform frames moved to references (slack 1)."""
    from qscore.media.sampling import uniform_indices
    from qscore.media.video import VideoReader, plan_near

    reader = VideoReader(path)
    index = reader._packet_index()
    targets = uniform_indices(reader.n_frames, 8)
    plan = plan_near(sorted(set(targets)), index.refs, 1)
    return reader, sorted({plan.get(t, t) for t in targets})


class SparseDecoder:
    """One zero-latency NVDEC decoder, reused from file to file (sessions are slow to make)."""

    def __init__(self, gpu: int = 0):
        self.gpu, self.decoder, self.codec = gpu, None, None

    def frames(self, reader, positions: list[int]) -> tuple[dict[int, object], int, list[str]]:
        """position -> uint8 (336, 336, 3) CUDA tensor; the number of packets decoded; problems."""
        import PyNvVideoCodec as nvc
        import torch

        index = reader._packet_index()
        want = set(positions)
        left = {}  # keyframe -> wanted positions of its GOP not yet out
        for p in positions:
            left.setdefault(index.keyframe_before(p), set()).add(p)
        keys = set(index.keys)
        demuxer = nvc.CreateDemuxer(filename=reader.path)
        codec = demuxer.GetNvCodecId()
        if self.decoder is None or self.codec != codec:
            self.codec = codec
            self.decoder = nvc.CreateDecoder(gpuid=self.gpu, codec=self.codec, usedevicememory=True,
                                             latency=nvc.DisplayDecodeLatencyType.ZERO)
        got, decoded, problems, gop = {}, 0, [], None
        for packet in demuxer:
            if packet.bsl == 0:
                continue
            p = index.position(packet.pts, -1)
            if p < 0:
                problems.append(f"packet pts {packet.pts} not in the index")
                continue
            if p in keys:
                gop = p
            pending = left.get(gop)
            if not pending or not (p in want or index.refs[p]):
                continue
            packet.decode_flag = nvc.VideoPacketFlag.ENDOFPICTURE
            out = self.decoder.Decode(packet)
            decoded += 1
            if len(out) != 1:
                problems.append(f"{len(out)} pictures for the packet of frame {p}")
            for frame in out:
                if frame.getPTS() != packet.pts:
                    problems.append(f"frame {p}: picture stamped {frame.getPTS()}, packet {packet.pts}")
                if p in want:
                    got[p] = reader_rgb(reader, torch.from_dlpack(frame))
                    pending.discard(p)
            if len(got) == len(want):
                break
        torch.cuda.current_stream().synchronize()  # done reading the decoder's surfaces
        return got, decoded, problems


def reader_rgb(reader, surface):
    """NV12 surface -> uint8 (336, 336, 3), as qscore's NVDEC reader converts."""
    from qscore.media.nvdec import NvdecReader

    return NvdecReader._to_rgb(reader, surface.cuda(), SIZE)


def decode_file(dec: SparseDecoder, path: str) -> None:
    """Q-CLIP's default frames of one file through ``dec``, as a runner worker would."""
    reader, positions = qclip_positions(path)
    dec.frames(reader, positions)
    reader.close()


def check(paths: list[str]) -> dict:
    """Frames of the sparse NVDEC path against the CPU decoder's, and the packets it decoded."""
    import numpy as np

    dec, diffs, decoded, problems = SparseDecoder(), [], [], []
    for path in paths:
        reader, positions = qclip_positions(path)
        got, n, bad = dec.frames(reader, positions)
        problems += bad
        if sorted(got) != positions:
            problems.append(f"{Path(path).name}: got {sorted(got)}, wanted {positions}")
        cpu = reader.frames(positions, size=SIZE)
        for p, c in zip(positions, cpu):
            if p in got:
                diffs.append(float(np.abs(got[p].cpu().numpy().astype(float) - c).mean()))
        decoded.append(n)
        reader.close()
    return {"files": len(paths), "mean_abs_diff_max": round(max(diffs), 3) if diffs else None,
            "mean_abs_diff_mean": round(sum(diffs) / len(diffs), 3) if diffs else None,
            "packets_decoded_per_file": round(sum(decoded) / len(decoded), 1),
            "problems": problems[:10], "n_problems": len(problems)}


def one_process(paths: list[str]) -> dict:
    """Per-file stages in this process, warm: PyAV open + index, sparse NVDEC decode of 8 frames."""
    import torch

    dec = SparseDecoder()
    decode_file(dec, paths[0])  # warm: context, session
    t_index = t_decode = 0.0
    for path in paths:
        t0 = time.perf_counter()
        reader, positions = qclip_positions(path)
        t1 = time.perf_counter()
        dec.frames(reader, positions)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        t_index += t1 - t0
        t_decode += t2 - t1
        reader.close()
    n = len(paths)
    return {"open_index_ms": round(1e3 * t_index / n, 1), "sparse_decode_ms": round(1e3 * t_decode / n, 1),
            "videos_per_s": round(n / (t_index + t_decode), 2)}


def _worker(paths: list[str], start, done) -> None:
    """One process of ``nvdec_probe.parallel``: its own CUDA context and decoder."""
    import torch

    torch.zeros(1, device="cuda")
    dec = SparseDecoder()
    decode_file(dec, paths[0])
    start.wait()
    t0 = time.perf_counter()
    for p in paths:
        decode_file(dec, p)
    torch.cuda.synchronize()
    done.put(time.perf_counter() - t0)


def threads(paths: list[str], n: int) -> dict:
    """n threads of this process, each with its own decoder, one CUDA context."""
    import torch

    decoders = [SparseDecoder() for _ in range(n)]
    for d in decoders:
        decode_file(d, paths[0])

    def run(d: SparseDecoder, share: list[str]) -> None:
        for p in share:
            decode_file(d, p)

    smi, t0 = gpu_sampler(), time.perf_counter()
    pool = [threading.Thread(target=run, args=(d, paths[i::n])) for i, d in enumerate(decoders)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"threads": n, "files": len(paths), "videos_per_s": round(len(paths) / wall, 2), **utilisation(smi)}


def make_clips(folder: Path, n: int) -> None:
    from qscore.bench import synthesize

    made = synthesize("video720", n, folder / "distinct", gop=50)  # one process per core
    for k in range(4):
        for i, path in enumerate(made):
            (folder / f"c{k}_{i:02d}.mp4").hardlink_to(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("clips", type=Path)
    p.add_argument("--procs", default="8,16")
    p.add_argument("--threads", default="4")
    p.add_argument("--json", type=Path)
    p.add_argument("--make", type=int, default=0)
    a = p.parse_args()
    if a.make:
        make_clips(a.clips, a.make)
    paths = sorted(str(f) for f in a.clips.glob("c*.mp4"))
    result: dict = {"clips": str(a.clips)}
    steps = [("check", lambda: check(paths[:4])), ("one_process", lambda: one_process(paths))]
    steps += [(f"threads_{t}", lambda t=t: threads(paths, int(t))) for t in a.threads.split(",") if t]
    steps += [(f"procs_{n}", lambda n=n: parallel(paths, int(n), _worker)) for n in a.procs.split(",") if n]
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
