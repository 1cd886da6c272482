"""A stand-in for PyNvVideoCodec (tests/test_nvdec.py): SimpleDecoder's calls qscore makes,
decoding with PyAV and handing out NV12 surfaces stamped as NVDEC stamps them (position p: the
p-th smallest packet dts). A file whose name
holds ``SimpleDecoder.fail`` raises; ``pts_shift`` makes the timestamps wrong. A package on disk,
so spawned DataLoader workers import it too (they read the environment: ``QSCORE_FAKE_NVDEC_FAIL``)."""

from __future__ import annotations

import os
import types

import av
import numpy as np
import torch

OutputColorType = types.SimpleNamespace(NATIVE=0)
__version__ = "fake"


class DecodedFrame:
    """A decoded surface: DLPack export and its pts."""

    def __init__(self, surface: np.ndarray, pts: int):
        self.surface, self.pts = torch.from_numpy(surface), pts

    def getPTS(self) -> int:
        return self.pts

    def __dlpack__(self, **kwargs):
        return self.surface.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.surface.__dlpack_device__()


class SimpleDecoder:
    fail: str | None = os.environ.get("QSCORE_FAKE_NVDEC_FAIL")
    pts_shift = 0

    def __init__(self, path: str, gpu_id: int = 0, use_device_memory: bool = True, output_color_type: int = 0):
        self.reconfigure_decoder(path)

    def reconfigure_decoder(self, path: str) -> None:
        self.path = path
        with av.open(path) as c:
            stamps = sorted(p.dts for p in c.demux(c.streams.video[0]) if p.size)
            c.seek(0)
            frames = sorted(c.decode(c.streams.video[0]), key=lambda f: f.pts)
        # as NVDEC's parser does: the decode timestamps handed out in display order
        self.frames = [(t, f.reformat(format="nv12").to_ndarray()) for t, f in zip(stamps, frames)]

    def __len__(self) -> int:
        return len(self.frames)

    def get_batch_frames_by_index(self, indices: list[int]) -> list[DecodedFrame]:
        if self.fail and self.fail in os.path.basename(self.path):
            raise RuntimeError("simulated NVDEC failure")
        return [DecodedFrame(self.frames[i][1], self.frames[i][0] + self.pts_shift) for i in indices]
