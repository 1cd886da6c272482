"""Decode time per video: exact frame positions vs ``frames_near`` (non-reference frames skipped).

    python benchmarks/decode_near.py CLIP.mp4 [CLIP2.mp4 ...] [--frames 8] [--size 336]

Prints, per clip and ``near`` in 0, 1, 2: best-of-3 milliseconds, the positions served, the frames
that went through the decoder, the decoder; then whether ``near=1`` gives the same pixels as an
exact decode of the frames it served. One process, one thread: run with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qscore.media.sampling import uniform_indices
from qscore.media.video import open_video


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("clips", nargs="+")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=336)
    args = p.parse_args()
    size = (args.size, args.size)
    for clip in args.clips:
        for near in (0, 1, 2):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                with open_video(clip) as reader:
                    wanted = uniform_indices(reader.n_frames, args.frames)
                    _, served = reader.frames_near(wanted, size, near)
                    touched, decoder = reader._touched, reader.decoder
                best = min(best, time.perf_counter() - t0)
            print(f"{clip} near={near}: {best * 1e3:.0f} ms, served {served}, decoded {touched} frames, {decoder}")
        with open_video(clip) as reader:
            frames, served = reader.frames_near(uniform_indices(reader.n_frames, args.frames), size, 1)
            print(f"{clip}: near=1 pixels identical to an exact decode of the served frames: {np.array_equal(frames, reader.frames(served, size))}")


if __name__ == "__main__":
    main()
