"""Video decoding on NVIDIA's hardware decoder (NVDEC) through PyNvVideoCodec.

The file is probed and its packets indexed by the CPU reader (PyAV demuxes; it decodes only the
first frame, for the rotation), so frame counts, positions and the ``frames_near`` plan are the
CPU decoder's: ``frames_used`` is the same on both. NVDEC is then fed only the packets the wanted
frames depend on (``packets_to_feed``: as the CPU path, it skips the non-reference frames that are
not wanted and the GOPs with nothing wanted; PyNvVideoCodec's indexed access decoded every frame
from the keyframe on, ~150 to serve Q-CLIP's 8 of a 2 s-GOP clip against ~91), in NV12, and the
colour conversion runs on the GPU with the matrix swscale (the CPU path) uses (BT.601; full range
for yuvj420p); frames come back as CUDA uint8 (T, H, W, 3) tensors.

Never a wrong frame: the decoder runs in zero-latency mode, one picture back per packet fed, in
the order fed, and a packet that gives anything but one picture fails the file. Files NVDEC is
not given (codecs other than H.264 / HEVC / VP9 / AV1, anything but 8-bit 4:2:0) and files it
fails on (a decoder error, a packet the index lacks, a wanted frame outside its GOP, an unexpected
surface) are decoded on the CPU, with the reason in ``decode_warnings``; their frames are copied
to the GPU, so callers see one type. Each thread has its own decoder: the runner prepares
GPU-decoded videos on threads of its own process, which share the model's CUDA context.
"""

from __future__ import annotations

import importlib.util
import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F

from qscore.media.video import VideoReader, _PacketIndex
from qscore.types import MediaError

NVDEC_CODECS = ("h264", "hevc", "vp9", "av1")
NVDEC_PIX_FMTS = ("yuv420p", "yuvj420p")  # 8-bit 4:2:0; full range for the "j" one

# BT.601 YCbCr -> RGB (swscale's default when a stream names no matrix): rows R, G, B over Cb, Cr
_BT601 = torch.tensor([[0.0, 1.402], [-0.344136, -0.714136], [1.772, 0.0]])


def available() -> bool:
    """PyNvVideoCodec is installed and a CUDA device is visible."""
    return importlib.util.find_spec("PyNvVideoCodec") is not None and torch.cuda.is_available()


class NvdecReader(VideoReader):
    """A ``VideoReader`` whose frames NVDEC decodes: CUDA uint8 (T, H, W, 3) tensors on
    ``device``; ``decoder`` is "nvdec", or "pyav" for a file that fell back to the CPU."""

    def __init__(self, path: str, *, max_side: int | None = None, threads: int = 1, device: Any = None):
        super().__init__(path, max_side=max_side, threads=threads)
        self.device = torch.device(device) if device is not None else _device()
        reason = self._unsupported()
        if reason:
            self.warnings.append(f"{reason}; decoded on the CPU")
        else:
            self.decoder = "nvdec"

    def _unsupported(self) -> str | None:
        if self.codec not in NVDEC_CODECS:
            return f"the GPU decoder does not take {self.codec}"
        if self.pix_fmt not in NVDEC_PIX_FMTS:
            return f"the GPU decoder takes 8-bit 4:2:0 only, not {self.pix_fmt}"
        return None

    # ---- the VideoReader hooks -------------------------------------------------------------
    def _exact(self, idx: list[int], size: tuple[int, int]) -> torch.Tensor:
        got = self._nvdec(sorted(set(idx)), size)
        if got is None:
            return torch.from_numpy(super()._exact(idx, size)).to(self.device)
        return torch.stack([got[i] for i in idx])

    def _references(self, positions: list[int], size: tuple[int, int]) -> dict[int, Any]:
        got = self._nvdec(positions, size)
        if got is None:
            return {p: torch.from_numpy(f).to(self.device) for p, f in super()._references(positions, size).items()}
        return got

    def _stack(self, frames: list[Any]) -> torch.Tensor:
        return torch.stack(frames)

    # ---- NVDEC ------------------------------------------------------------------------------
    def _nvdec(self, positions: list[int], size: tuple[int, int]) -> dict[int, torch.Tensor] | None:
        """position -> uint8 (h, w, 3) on the device for the sorted ``positions``; None (and the
        reader switched to the CPU, the reason noted) when NVDEC cannot serve this file."""
        if self.decoder != "nvdec":
            return None
        try:
            feed = packets_to_feed(self._index, positions)
            return _session(self.device).decode(self.path, self._index, feed, set(positions), lambda s: self._to_rgb(s, size))
        except Exception as e:  # noqa: BLE001 - any NVDEC problem: this file goes to the CPU
            self.warnings.append(f"GPU decoder failed ({type(e).__name__}: {str(e)[:160]}); decoded on the CPU")
            self.decoder = "pyav"
            return None

    def _to_rgb(self, surface: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """An NV12 surface (luma rows, then half as many interleaved chroma rows; either may be
        padded) -> uint8 (h, w, 3) at the output ``size``, displayed orientation, as the CPU
        path makes it: convert (scaling first, in YUV, when a size is asked), rotate."""
        h, w = (self.width, self.height) if self.rotation in (90, 270) else (self.height, self.width)
        if surface.dim() == 3 and surface.shape[-1] == 1:
            surface = surface[..., 0]
        rows = surface.shape[0]
        luma = rows * 2 // 3
        if surface.dim() != 2 or luma < h or surface.shape[1] < w or rows != luma + luma // 2:
            raise MediaError(f"unexpected NV12 surface {tuple(surface.shape)} for a {w}x{h} stream")
        y, uv = surface[:h, :w], surface[luma : luma + (h + 1) // 2, : w + w % 2]
        stored = (size[1], size[0]) if self.rotation in (90, 270) else size
        rgb = nv12_to_rgb(y, uv, full_range=self.pix_fmt == "yuvj420p", size=stored)  # (3, h, w)
        rgb = rgb.round_().clamp_(0, 255).to(torch.uint8)
        return torch.rot90(rgb, self.rotation // 90, dims=(1, 2)).permute(1, 2, 0)


def nv12_to_rgb(y: torch.Tensor, uv: torch.Tensor, full_range: bool = False, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 luma (H, W) and interleaved chroma (ceil(H/2), W) -> float RGB (3, h, w) in [0, 255]
    (unrounded), BT.601, at ``size`` (h, w) (default: the frame's own).

    Unscaled, each chroma sample covers its 2x2 block, as swscale's unscaled path does. Scaled,
    the planes are resized before the conversion, as swscale does: luma to (h, w), chroma to
    (h, ceil(w/2)), each chroma sample then covering 2 pixels of a row (antialiased bilinear for
    both, swscale's default). Converting first and resizing RGB differs from the CPU path by a
    mean of 15.6 per channel value on sharp-edged content (8x8-block synthetic 720p -> 336²),
    this order by 3.3 (1.5 on bigbuckbunny.mp4)."""
    h, w = y.shape
    out = (h, w) if size is None else (int(size[0]), int(size[1]))
    yf = y.float()
    c = uv.float().reshape(uv.shape[0], -1, 2).permute(2, 0, 1)  # (2, H/2, W/2): Cb, Cr
    if out == (h, w):
        c = c.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :h, :w]
    else:
        yf = F.interpolate(yf[None, None], size=out, mode="bilinear", align_corners=False, antialias=True)[0, 0]
        c = F.interpolate(c[None], size=(out[0], (out[1] + 1) // 2), mode="bilinear", align_corners=False, antialias=True)[0]
        c = c.repeat_interleave(2, 2)[:, :, : out[1]]
    c = c - 128.0
    if not full_range:  # limited range: luma 16..235, chroma 16..240
        yf = (yf - 16.0) * (255.0 / 219.0)
        c = c * (255.0 / 224.0)
    m = _BT601.to(y.device)
    rgb = yf[None] + torch.einsum("kc,chw->khw", m, c)
    return rgb.clamp_(0, 255)


def _device() -> torch.device:
    """Where frames go: the current CUDA device (the CPU without one: the tests' stand-in)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def packets_to_feed(index: _PacketIndex, wanted: list[int]) -> list[int]:
    """The positions whose packets NVDEC decodes to serve ``wanted``, in decode order: in a GOP
    that still has a wanted frame to come, the wanted frames and the reference frames (every
    frame where references are not known, codecs other than H.264); nothing of a GOP once its
    wanted frames are out, nor of GOPs with none. What the CPU path decodes, as the same pure
    function of the packet index. MediaError where a wanted frame would not be fed (a leading
    frame of an open GOP, decoded after the next keyframe)."""
    keys, want, left = set(index.keys), set(wanted), {}
    for p in wanted:
        left.setdefault(index.keyframe_before(p), set()).add(p)
    feed, gop = [], None
    for p in index.decode_order:
        gop = p if p in keys else gop
        pending = left.get(gop)
        if pending and (p in want or index.refs is None or index.refs[p]):
            feed.append(p)
            pending.discard(p)
    missed = want.difference(feed)
    if missed:
        raise MediaError(f"frames {sorted(missed)[:5]} lie outside the GOP they are shown in")
    return feed


class _Session:
    """One thread's NVDEC decoder, kept from file to file (sessions are slow to make) while the
    codec and frame size stay, in zero-latency mode: each packet fed (flagged as a whole
    picture) gives back its picture at once, in decode order, so the pictures are known by the
    order they were fed in. PyNvVideoCodec's pictures carry no timestamp on this path (all 0,
    seen on the H200, 2026-12-04): the check is that each fed packet gives exactly one."""

    def __init__(self, device: torch.device):
        self.device, self.decoder, self.key = device, None, None

    def decode(self, path: str, index: _PacketIndex, feed: list[int], want: set[int],
               convert: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, torch.Tensor]:
        """``convert``(NV12 surface) for each wanted position, feeding ``feed``'s packets only."""
        import PyNvVideoCodec as nvc

        demuxer = nvc.CreateDemuxer(filename=path)
        key = (demuxer.GetNvCodecId(), demuxer.Width(), demuxer.Height())
        if self.decoder is None or self.key != key:
            self.decoder, self.key = None, key
            self.decoder = nvc.CreateDecoder(gpuid=self.device.index or 0, codec=key[0], usedevicememory=True,
                                             latency=nvc.DisplayDecodeLatencyType.ZERO)
        todo, got, stream = set(feed), {}, _stream(self.device)
        for packet in demuxer:
            if packet.bsl == 0:
                continue
            p = index.position(packet.pts, -1)
            if p < 0:
                raise MediaError(f"a packet (pts {packet.pts}) is not in the index")
            if p not in todo:
                continue
            packet.decode_flag = int(nvc.VideoPacketFlag.ENDOFPICTURE)
            pictures = self.decoder.Decode(packet)
            if len(pictures) != 1:
                self.decoder = None  # its state is not known any more: a new session next time
                raise MediaError(f"{len(pictures)} pictures for the packet of frame {p}")
            todo.discard(p)
            if p in want:
                got[p] = convert(torch.from_dlpack(pictures[0]).to(self.device))  # no copy on NVDEC
                if stream is not None:  # the decoder reuses its surfaces: done reading this one first
                    stream.synchronize()
            if not todo:
                return got
        raise MediaError(f"the demuxer gave no packet for frames {sorted(todo)[:5]}")


_LOCAL = threading.local()  # each preparing thread its own sessions, one per device


def _session(device: torch.device) -> _Session:
    sessions = _LOCAL.__dict__.setdefault("sessions", {})
    if device not in sessions:
        sessions[device] = _Session(device)
    return sessions[device]


def _stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device) if device.type == "cuda" else None
