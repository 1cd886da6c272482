"""Video decoding on NVIDIA's hardware decoder (NVDEC) through PyNvVideoCodec.

The file is probed and its packets indexed by the CPU reader (PyAV demuxes; it decodes only the
first frame, for the rotation), so frame counts, positions and the ``frames_near`` plan are the
CPU decoder's: ``frames_used`` is the same on both. NVDEC then decodes the frames asked for, in
NV12, and the colour conversion runs on the GPU with the matrix swscale (the CPU path) uses
(BT.601; full range for yuvj420p); frames come back as CUDA uint8 (T, H, W, 3) tensors.

Never a wrong frame: every frame NVDEC returns must carry the timestamp the packet index
predicts for its position (NVDEC's parser hands the packets' decode timestamps out in display
order, so position p gets the p-th smallest dts: seen on the H200, 2026-12-03, where the pts
of x264 clips with B-frames came out two frames early). Files NVDEC is not given (codecs other
than H.264 / HEVC / VP9 / AV1, anything but 8-bit 4:2:0, packets without dts) and files it
fails on (a decoder error, a frame count or timestamp that disagrees with the index, an
unexpected surface) are decoded on the CPU, with the reason in ``decode_warnings``; their
frames are copied to the GPU, so callers see one type.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from qscore.media.video import VideoReader
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
            decoder = _decoder(self.path, self.device)
            if len(decoder) != self.n_frames:
                raise MediaError(f"it counts {len(decoder)} frames, the container {self.n_frames}")
            stamps = self._index.dts
            if stamps is None:
                raise MediaError("packets without decode timestamps: its frames could not be checked")
            frames = decoder.get_batch_frames_by_index(list(positions))
            if len(frames) != len(positions):
                raise MediaError(f"{len(frames)} frames for {len(positions)} asked")
            got = {}
            for p, frame in zip(positions, frames):
                if frame.getPTS() != stamps[p]:
                    raise MediaError(f"frame {p} came stamped {frame.getPTS()}, the index expects {stamps[p]}")
                got[p] = self._to_rgb(torch.from_dlpack(frame).to(self.device), size)  # no copy on NVDEC
            # the decoder may reuse its surfaces on the next call: finish reading them first
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            return got
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


_DECODERS: dict[Any, Any] = {}  # one PyNvVideoCodec decoder per device and process, reused file to file


def _decoder(path: str, device: torch.device) -> Any:
    """A PyNvVideoCodec SimpleDecoder on ``path``: the process's cached one pointed at the new
    file (NVDEC sessions are slow to create), or a new one."""
    import PyNvVideoCodec as nvc

    cached = _DECODERS.get(device)
    if cached is not None:
        try:
            cached.reconfigure_decoder(path)
            return cached
        except Exception:  # noqa: BLE001 - a stream the cached session cannot take: start anew
            _DECODERS.pop(device, None)
    decoder = nvc.SimpleDecoder(
        path, gpu_id=device.index or 0, use_device_memory=True, output_color_type=nvc.OutputColorType.NATIVE
    )
    _DECODERS[device] = decoder
    return decoder

