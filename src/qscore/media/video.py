"""Video decoding on the CPU with PyAV (FFmpeg), or on NVIDIA's hardware decoder where asked
(``configure(decoder="gpu")``, see ``qscore.media.nvdec``).

PyAV probes the file first (streams, codec, rotation) and indexes its packets by demuxing
(frame count, keyframes, which frames are references), which gives clear errors for text,
audio-only and unreadable files and the same frame positions whatever decoder then runs. It
decodes only what a request needs: from the keyframe before each wanted frame, skipping the
non-reference frames that are not wanted (no frame depends on them, so the wanted ones come
out bit-identical), and says in ``warnings`` which frames were missing or concealed. decord,
used before, decoded every frame between keyframe and target (slower for every sampler here,
docs/benchmarks.md), duplicated frames on damaged streams unless told not to, and failed on
rotated ones.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from qscore.media.image import looks_like_text, open_file
from qscore.types import MediaError, UsageError

MAX_FRAMES_PER_CALL = 1024  # frames one ``frames()`` call may return
MAX_FRAMES_TOUCHED = 20_000  # frames PyAV may decode per file (seeks land on keyframes)


@dataclass
class DecodeSettings:
    """How this process decodes: ``decoder`` "cpu" (PyAV) or "gpu" (NVDEC), and the threads
    one CPU decoder may use (the runner gives each worker its share of the cores)."""

    decoder: str = "cpu"
    threads: int = 1


SETTINGS = DecodeSettings()


def configure(decoder: str, threads: int, worker_id: int | None = None) -> DecodeSettings:
    """Set this process's decoding and return the settings it replaces. Also the runner's
    DataLoader ``worker_init_fn`` (through functools.partial; ``worker_id`` is unused): spawned
    workers do not inherit the parent's module state."""
    if decoder not in ("cpu", "gpu"):
        raise ValueError(f"decoder must be cpu or gpu here, got {decoder!r}")
    before = DecodeSettings(SETTINGS.decoder, SETTINGS.threads)
    SETTINGS.decoder, SETTINGS.threads = decoder, max(1, int(threads))
    return before


def pick_decoder(choice: str, device_type: str) -> str:
    """``--decoder`` auto | cpu | gpu -> "cpu" or "gpu". auto takes the CPU decoder: on the H200
    (docs/benchmarks.md, 2026-12-04) the runner with NVDEC was level with it or slower (Q-CLIP
    25.2 against 25.8 videos/s at 720p, MVQA-tiny 18.5 against 25.4) and faster only for CLiF-VQA
    (19.0 against 17.2). gpu raises UsageError where PyNvVideoCodec or CUDA is missing."""
    from qscore.media import nvdec

    if choice not in ("auto", "cpu", "gpu"):
        raise UsageError(f"--decoder must be auto, cpu or gpu, got {choice!r}")
    if choice != "gpu":
        return "cpu"
    if device_type != "cuda" or not nvdec.available():
        raise UsageError("--decoder gpu needs a CUDA device and PyNvVideoCodec (pip install 'qscore[nvdec]')")
    return "gpu"


def open_video(path: str, *, max_side: int | None = None, threads: int | None = None) -> VideoReader:
    """Open ``path`` for frame access; raises MediaError for anything that is not a decodable
    video. ``max_side`` caps the longer side of frames returned without an explicit size. With
    the GPU decoder configured, frames come back as CUDA uint8 tensors instead of arrays."""
    threads = threads or SETTINGS.threads
    if SETTINGS.decoder == "gpu":
        from qscore.media.nvdec import NvdecReader

        return NvdecReader(path, max_side=max_side, threads=threads)
    return VideoReader(path, max_side=max_side, threads=threads)


class VideoReader:
    """One open video. ``width``/``height`` are the displayed size (after rotation); ``rotation``
    is counter-clockwise degrees from the display matrix; ``decoder`` is the backend that served
    the frames ("pyav", or "nvdec" on the GPU); ``warnings`` collects decode problems for the row.
    ``threads`` > 1 lets one decoder use that many cores (frame threads)."""

    def __init__(self, path: str, *, max_side: int | None = None, threads: int = 1):
        self.path = path
        self.max_side = max_side
        self.threads = threads
        self.warnings: list[str] = []
        self._file = open_file(path)  # clear errors for missing / unreadable / empty files
        try:
            self._probe(self._file.read(512))
            self._touched = 0
            self._reformatter = VideoReformatter()  # one scaler context for all frames: 4x cheaper
            self._index = _PacketIndex.build(self._container, self._stream, self.warnings)
            self.n_frames = self._index.n_frames
            if self.n_frames < 1:
                raise MediaError("video stream holds no frames")
            self.decoder = "pyav"
        except BaseException:
            self.close()
            raise

    # ---- opening ---------------------------------------------------------------------------
    def _probe(self, head: bytes) -> None:
        try:
            self._container = _av_open(self.path)
        except av.error.FFmpegError as e:
            if looks_like_text(head):
                raise MediaError("not a video: the file holds text") from e
            raise MediaError(f"cannot open video (corrupt, truncated or not a video): {_av_reason(e)}") from e
        streams = self._container.streams
        if not len(streams):
            raise MediaError("cannot open video: no readable streams (corrupt or truncated container)")
        if not streams.video:
            kinds = ", ".join(sorted({s.type for s in streams}))
            raise MediaError(f"no video stream (the file has only {kinds})")
        self._stream = stream = streams.video[0]
        ctx = stream.codec_context
        ctx.thread_count = self.threads
        ctx.thread_type = "AUTO" if self.threads > 1 else "SLICE"
        self.codec = ctx.name
        self.pix_fmt = ctx.pix_fmt
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate else 0.0
        if stream.duration and stream.time_base:
            self.duration_s = float(stream.duration * stream.time_base)
        else:
            self.duration_s = (self._container.duration or 0) / av.time_base
        self.rotation = self._first_frame_rotation()
        w, h = ctx.width, ctx.height
        if not w or not h:
            raise MediaError("video stream has no frame size (corrupt header)")
        self.width, self.height = (h, w) if self.rotation in (90, 270) else (w, h)

    def _first_frame_rotation(self) -> int:
        """Rotation from the display matrix, which PyAV exposes on decoded frames."""
        try:
            frame = next(self._container.decode(self._stream))
            rotation = int(round(frame.rotation)) % 360
        except (StopIteration, av.error.FFmpegError):
            return 0
        return rotation if rotation in (90, 180, 270) else 0

    def _packet_index(self) -> _PacketIndex:
        return self._index

    # ---- frames ------------------------------------------------------------------------------
    def frames(self, indices: Sequence[int], size: tuple[int, int] | None = None) -> np.ndarray:
        """Frames at ``indices`` (any order, repeats allowed) as uint8 (T, H, W, 3), displayed
        orientation. ``size=(h, w)`` makes the decoder scale while decoding (no aspect keeping);
        without it frames come at the native size capped by ``max_side``."""
        return self._exact(self._checked(indices), self._output_size(size))

    def _exact(self, idx: list[int], size: tuple[int, int]) -> np.ndarray:
        """uint8 (T, h, w, 3) at exactly the positions ``idx``."""
        return self._pyav_frames(idx, size)

    def frames_near(self, indices: Sequence[int], size: tuple[int, int] | None = None, near: int = 1) -> tuple[np.ndarray, list[int]]:
        """Like ``frames``, but each frame may come from the nearest *reference* frame at most
        ``near`` positions away (``plan_near``), so the decoder skips the frames no other frame
        refers to (the non-reference B-frames of most web encodes: half of x264 veryfast's
        frames, half the decode time). The positions come from the packet index alone, so every
        decoder serves the same ones. Returns (uint8 (T, H, W, 3), positions served); a request
        with no reference frame that close, or in a codec whose references are not known
        (only H.264's are read), is decoded exactly. ``near=0``: ``frames``."""
        idx = self._checked(indices)
        if near <= 0 or self._index.refs is None:
            return self.frames(idx, size), idx
        out_size = self._output_size(size)
        plan = plan_near(sorted(set(idx)), self._index.refs, near)
        served = sorted(set(plan.values()))
        got = self._references(served, out_size)
        missing = [t for t in plan if plan[t] not in got]  # damaged: decode those exactly
        exact = sorted(set(idx) - set(plan) | set(missing))
        if exact:
            got.update(zip(exact, self._exact(exact, out_size)))
            plan.update({t: t for t in exact})
        used = [plan[i] for i in idx]
        return self._stack([got[p] for p in used]), used

    def _references(self, positions: list[int], size: tuple[int, int]) -> dict[int, Any]:
        """position -> frame for reference frames; a position that did not decode is left out."""
        got, corrupt = self._pyav_decode(positions, size)
        self._note_corrupt(corrupt)
        return got

    def _stack(self, frames: list[Any]) -> np.ndarray:
        return np.stack(frames)

    def _rgb(self, frame: av.VideoFrame, stored: tuple[int, int]) -> np.ndarray:
        """A decoded frame at the decoder's (h, w) ``stored``, turned to its displayed orientation."""
        rgb = self._reformatter.reformat(frame, width=stored[1], height=stored[0], format="rgb24")
        return np.rot90(rgb.to_ndarray(), self.rotation // 90)

    def _checked(self, indices: Sequence[int]) -> list[int]:
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("frames() needs at least one index")
        if len(idx) > MAX_FRAMES_PER_CALL:
            raise ValueError(f"{len(idx)} frames asked for; at most {MAX_FRAMES_PER_CALL} per call")
        bad = [i for i in idx if not 0 <= i < self.n_frames]
        if bad:
            raise ValueError(f"frame indices {bad[:5]} outside [0, {self.n_frames})")
        return idx

    def _output_size(self, size: tuple[int, int] | None) -> tuple[int, int]:
        if size is not None:
            return int(size[0]), int(size[1])
        h, w = self.height, self.width
        if self.max_side and max(h, w) > self.max_side:
            s = self.max_side / max(h, w)
            return max(1, round(h * s)), max(1, round(w * s))
        return h, w

    def _pyav_frames(self, idx: list[int], size: tuple[int, int]) -> np.ndarray:
        got, corrupt = self._pyav_decode(sorted(set(idx)), size)
        if not got:
            raise MediaError("no frame of the video could be decoded")
        missing = sorted(set(idx) - set(got))
        if missing:
            self.warnings.append(f"frames {_span(missing)} could not be decoded; the nearest decoded frames stand in")
        self._note_corrupt(corrupt)
        have = sorted(got)
        return np.stack([got[i] if i in got else got[_nearest(have, i)] for i in idx])

    def _note_corrupt(self, corrupt: list[int]) -> None:
        if corrupt:
            self.warnings.append(f"frames {_span(corrupt)} decoded with errors (concealed by the decoder)")

    def _pyav_decode(self, wanted: list[int], size: tuple[int, int]) -> tuple[dict[int, np.ndarray], list[int]]:
        """Decode the sorted positions ``wanted`` -> (position -> frame, positions decoded with
        errors). Decodes forward, seeking to a keyframe only when it is ahead of the decoder, and
        skips the non-reference frames that are not wanted: no other frame depends on them, so
        the wanted ones come out the same, at a fraction of the work."""
        index = self._index
        want = set(wanted)
        got: dict[int, np.ndarray] = {}
        corrupt: list[int] = []
        stored = (size[1], size[0]) if self.rotation in (90, 270) else size  # decoder's (h, w)
        decoded: Iterator[tuple[int, av.VideoFrame]] | None = None
        pos = -1  # index of the last frame decoded, -1 before any
        for target in wanted:
            if target in got:
                continue
            key = index.keyframe_before(target)
            if decoded is None or target <= pos or key > pos:
                decoded = self._decode_from(index, key, {index.pts[i] for i in wanted})
            for i, frame in decoded:
                pos = i
                if i in want and i not in got:
                    got[i] = self._rgb(frame, stored)
                    corrupt += [i] if frame.is_corrupt else []
                if i >= target:
                    break
            else:
                decoded, pos = None, -1
        return got, corrupt

    def _decode_from(self, index: _PacketIndex, key: int, keep: set[int]) -> Iterator[tuple[int, av.VideoFrame]]:
        """Seek to the keyframe at position ``key`` and yield (position, frame) onwards; packets
        that fail to decode are skipped (their frames then show up as missing). Packets whose pts
        is not in ``keep`` go through FFmpeg's skip_frame=NONREF: a non-reference frame among
        them is not decoded (FFmpeg reads the setting per packet, frame threads included)."""
        self._container.seek(index.pts[key], stream=self._stream, backward=True, any_frame=False)
        packets = self._container.demux(self._stream)
        ctx = self._stream.codec_context
        pos = key - 1
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError:  # damaged container (e.g. truncated mid-stream)
                return
            ctx.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in keep else "NONREF"
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue
            for frame in frames:
                self._touched += 1
                if self._touched > MAX_FRAMES_TOUCHED:
                    raise MediaError(f"decoding touched more than {MAX_FRAMES_TOUCHED} frames of this file; giving up")
                pos = index.position(frame.pts, pos + 1)
                yield pos, frame

    # ---- facts and lifetime ------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        """The row's media columns."""
        notes = list(dict.fromkeys(self.warnings))
        return {
            "width": self.width,
            "height": self.height,
            "n_frames": self.n_frames,
            "fps": self.fps,
            "duration_s": self.duration_s,
            "decoder": self.decoder,
            "decode_warnings": "; ".join(notes) or None,
        }

    def close(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
        self._file.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_near(targets: list[int], refs: Sequence[bool], near: int) -> dict[int, int]:
    """target -> the reference frame that serves it: for each target in ascending order, the
    reference position within ``near`` that no earlier target took, nearest first, the earlier
    on a tie (a taken one when all are taken). Targets with no reference that close are left
    out (decoded exactly). A pure function of the packet index: the same on every decoder."""
    served: dict[int, int] = {}
    taken: set[int] = set()
    for t in targets:
        options = [p for p in range(max(0, t - near), min(len(refs), t + near + 1)) if refs[p]]
        if options:
            served[t] = best = min(options, key=lambda p: (p in taken, abs(p - t), p))
            taken.add(best)
    return served


class _PacketIndex:
    """Presentation order of the video packets: frame position <-> pts, keyframe positions, and
    (H.264) which positions are reference frames. Built by demuxing (no decoding), so counts are
    exact."""

    def __init__(self, pts: list[int], keys: list[int], refs: dict[int, bool] | None = None):
        """``pts``: the packets' timestamps in demux (decode) order; ``keys``: the keyframes'."""
        self.pts = sorted(pts)
        self._position = {p: i for i, p in enumerate(self.pts)}
        self.keys = sorted({self._position[k] for k in keys}) or [0]
        self.n_frames = len(self.pts)
        self.refs = [refs.get(p, True) for p in self.pts] if refs is not None else None
        self.decode_order = [self._position[p] for p in pts]  # positions as the packets come

    @classmethod
    def build(cls, container: Any, stream: Any, warnings: list[str]) -> _PacketIndex:
        pts: list[int] = []
        keys: list[int] = []
        is_ref = _reference_test(stream.codec_context)
        refs: dict[int, bool] | None = {} if is_ref else None
        container.seek(0, stream=stream, backward=True, any_frame=True)
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                p = packet.pts if packet.pts is not None else packet.dts
                p = p if p is not None else len(pts)
                pts.append(p)
                if packet.is_keyframe:
                    keys.append(p)
                if refs is not None:
                    refs[p] = is_ref(memoryview(packet))
        except av.error.FFmpegError as e:
            warnings.append(f"container damaged after {len(pts)} frames ({_av_reason(e)})")
        if stream.frames and stream.frames > len(pts):
            warnings.append(f"the header promises {stream.frames} frames but the file holds {len(pts)} (truncated?)")
        return cls(pts, keys, refs)

    def keyframe_before(self, position: int) -> int:
        return self.keys[max(0, bisect.bisect_right(self.keys, position) - 1)]

    def position(self, pts: int | None, default: int) -> int:
        return self._position.get(pts, default) if pts is not None else default


def _reference_test(ctx: Any) -> Any:
    """For H.264, a test ``packet bytes -> bool``: does the packet hold a reference picture
    (its first slice's nal_ref_idc is not 0: what FFmpeg's skip_frame=NONREF keeps). None for
    other codecs. Reads length-prefixed (MP4/MKV, avcC extradata) and Annex B (start code)
    streams."""
    if ctx.name != "h264":
        return None
    extra = ctx.extradata or b""
    prefix = (extra[4] & 3) + 1 if len(extra) > 4 and extra[0] == 1 else 0  # 0: Annex B

    def nal_headers(data: memoryview) -> Iterator[int]:
        if prefix:
            at = 0
            while at + prefix < len(data):
                yield data[at + prefix]
                at += prefix + int.from_bytes(data[at : at + prefix], "big")
        else:
            raw = bytes(data[:4096])  # the slice header follows the parameter sets and SEI
            for m in re.finditer(b"\x00\x00\x01", raw):
                if m.end() < len(raw):
                    yield raw[m.end()]

    def is_ref(data: memoryview) -> bool:
        for header in nal_headers(data):
            if 1 <= header & 0x1F <= 5:  # a coded slice (5: IDR)
                return bool(header & 0x60)
        return True  # no slice found: keep it, so nothing is planned on a frame that is not there

    return is_ref


def _av_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _nearest(sorted_have: list[int], i: int) -> int:
    j = bisect.bisect_left(sorted_have, i)
    options = sorted_have[max(0, j - 1) : j + 1]
    return min(options, key=lambda k: (abs(k - i), k))


def _span(positions: list[int]) -> str:
    """Short list of frame positions for a warning: '3, 5, 7-40'."""
    parts, run = [], [positions[0]]
    for p in positions[1:]:
        if p == run[-1] + 1:
            run.append(p)
        else:
            parts.append(run)
            run = [p]
    parts.append(run)
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in parts)
    return text if len(text) < 120 else text[:117] + "..."


def _av_open(path: str) -> Any:
    """av.open, ignoring undecodable metadata where PyAV has the option (it went in PyAV 19)."""
    try:
        return av.open(path, metadata_errors="ignore")
    except TypeError:
        return av.open(path)
