"""A stand-in for PyNvVideoCodec (tests/test_nvdec.py): the low-level calls qscore makes
(CreateDemuxer, CreateDecoder in zero-latency mode, Decode), decoding with PyAV and handing out
NV12 surfaces as NVDEC does: one picture per packet fed, stamped 0. ``FakeDecoder.fed`` lists the
(file name, pts) of every packet fed; a file whose name holds ``FakeDecoder.fail`` raises, one
whose name holds ``FakeDecoder.silent`` gives no picture for its packets after the first."""

from __future__ import annotations

import os
import types

import av
import numpy as np
import torch

DisplayDecodeLatencyType = types.SimpleNamespace(NATIVE=0, LOW=1, ZERO=2)
VideoPacketFlag = types.SimpleNamespace(TIMESTAMP=2, ENDOFPICTURE=8)
__version__ = "fake"


class DecodedFrame:
    """A decoded surface: DLPack export, and the timestamp this path gives (none: 0)."""

    def __init__(self, surface: np.ndarray):
        self.surface = torch.from_numpy(surface)

    def getPTS(self) -> int:
        return 0

    def __dlpack__(self, **kwargs):
        return self.surface.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.surface.__dlpack_device__()


class Packet:
    def __init__(self, name: str, pts: int, size: int):
        self.name, self.pts, self.bsl, self.decode_flag = name, pts, size, 0


class Demuxer:
    """The file's video packets in decode order; its NV12 frames by pts, for the decoder."""

    def __init__(self, filename: str):
        self.name = os.path.basename(filename)
        with av.open(filename) as c:
            stream = c.streams.video[0]
            self.codec, self.width, self.height = stream.codec_context.name, stream.width, stream.height
            self.packets = [Packet(self.name, p.pts, p.size) for p in c.demux(stream)]
            c.seek(0)
            FRAMES[self.name] = {f.pts: f.reformat(format="nv12").to_ndarray() for f in c.decode(stream)}

    def __iter__(self):
        return iter(self.packets)

    def GetNvCodecId(self) -> str:
        return self.codec

    def Width(self) -> int:
        return self.width

    def Height(self) -> int:
        return self.height


FRAMES: dict[str, dict[int, np.ndarray]] = {}


class FakeDecoder:
    fail: str | None = None
    silent: str | None = None
    fed: list[tuple[str, int]] = []

    def __init__(self, gpuid: int, codec: str, usedevicememory: bool, latency: int):
        assert latency == DisplayDecodeLatencyType.ZERO, "qscore relies on zero latency: a picture per packet"
        self.codec = codec

    def Decode(self, packet: Packet) -> list[DecodedFrame]:
        if self.fail and self.fail in packet.name:
            raise RuntimeError("simulated NVDEC failure")
        assert packet.decode_flag == VideoPacketFlag.ENDOFPICTURE
        first = not any(name == packet.name for name, _ in self.fed)
        self.fed.append((packet.name, packet.pts))
        if self.silent and self.silent in packet.name and not first:
            return []
        return [DecodedFrame(FRAMES[packet.name][packet.pts])]


def CreateDemuxer(filename: str) -> Demuxer:
    return Demuxer(filename)


def CreateDecoder(gpuid: int = 0, codec: str = "h264", usedevicememory: bool = True, latency: int = 0) -> FakeDecoder:
    return FakeDecoder(gpuid, codec, usedevicememory, latency)
