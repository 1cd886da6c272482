"""Video decoding: decord first (fast, what reference implementations use), PyAV as the fallback
that also reports exactly which frames are broken.

PyAV always probes the file first (streams, codec, rotation), which gives clear errors for text,
audio-only and unreadable files. decord then decodes, with a fault tolerance so small that any
frame it would have to duplicate makes it raise instead; the reader then switches to PyAV, which
decodes what exists and says in ``warnings`` which frames were missing or concealed.
"""

from __future__ import annotations

import bisect
import os
import re
from typing import Any, Iterator, Sequence

import av
import numpy as np

from qscore.media.image import looks_like_text, open_file
from qscore.types import MediaError

DECORD_FAULT_TOL = "0.000001"  # a ratio: one recovered (duplicated) frame already exceeds it
MAX_FRAMES_PER_CALL = 1024  # frames one ``frames()`` call may return
MAX_FRAMES_TOUCHED = 20_000  # frames PyAV may decode per file (seeks land on keyframes)


def open_video(path: str, *, max_side: int | None = None, threads: int = 1) -> VideoReader:
    """Open ``path`` for frame access; raises MediaError for anything that is not a decodable
    video. ``max_side`` caps the longer side of frames returned without an explicit size."""
    return VideoReader(path, max_side=max_side, threads=threads)


class VideoReader:
    """One open video. ``width``/``height`` are the displayed size (after rotation); ``rotation``
    is counter-clockwise degrees from the display matrix; ``decoder`` is the backend that served
    the frames ("decord" or "pyav"); ``warnings`` collects decode problems for the row."""

    def __init__(self, path: str, *, max_side: int | None = None, threads: int = 1):
        self.path = path
        self.max_side = max_side
        self.threads = threads
        self.warnings: list[str] = []
        self._file = open_file(path)  # clear errors for missing / unreadable / empty files
        try:
            self._probe(self._file.read(512))
            self._decord: dict[tuple[int, int], Any] = {}
            self._index: _PacketIndex | None = None
            self._touched = 0
            # decord 0.6 returns 4-channel or mis-sized frames for rotated videos: PyAV serves them
            self.decoder = "pyav" if self.rotation else self._try_decord()
            if self.decoder == "pyav":
                self.n_frames = self._packet_index().n_frames
            if self.n_frames < 1:
                raise MediaError("video stream holds no frames")
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
        self.codec = ctx.name
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
        self.n_frames = stream.frames  # refined by the decoder that serves the file

    def _first_frame_rotation(self) -> int:
        """Rotation from the display matrix, which PyAV exposes on decoded frames."""
        try:
            frame = next(self._container.decode(self._stream))
            rotation = int(round(frame.rotation)) % 360
        except (StopIteration, av.error.FFmpegError):
            return 0
        return rotation if rotation in (90, 180, 270) else 0

    def _try_decord(self) -> str:
        """Open decord at the default output size; "pyav" when decord cannot serve this file."""
        try:
            vr = self._decord_at(self._output_size(None))
        except MediaError as e:
            self.warnings.append(str(e))
            return "pyav"
        self.n_frames = len(vr)
        return "decord"

    def _decord_at(self, size: tuple[int, int]) -> Any:
        """A decord reader that decodes straight to ``size`` (h, w); one per size."""
        if size not in self._decord:
            try:
                import decord
            except ImportError as e:
                raise MediaError("decord is not installed; decoded with PyAV") from e

            uri = _ascii_safe_path(self.path, self._file.fileno())
            if uri is None:
                raise MediaError("decord cannot open this file name; decoded with PyAV")
            try:
                self._decord[size] = decord.VideoReader(
                    uri, ctx=decord.cpu(0), width=size[1], height=size[0],
                    num_threads=self.threads, fault_tol=DECORD_FAULT_TOL,
                )
            except Exception as e:  # DECORDError, RuntimeError, AssertionError on bad counts
                raise MediaError(f"decord could not open the file ({_first_line(e)}); decoded with PyAV") from e
        return self._decord[size]

    def _packet_index(self) -> _PacketIndex:
        if self._index is None:
            self._index = _PacketIndex.build(self._container, self._stream, self.warnings)
        return self._index

    # ---- frames ------------------------------------------------------------------------------
    def frames(self, indices: Sequence[int], size: tuple[int, int] | None = None) -> np.ndarray:
        """Frames at ``indices`` (any order, repeats allowed) as uint8 (T, H, W, 3), displayed
        orientation. ``size=(h, w)`` makes the decoder scale while decoding (no aspect keeping);
        without it frames come at the native size capped by ``max_side``."""
        idx = self._checked(indices)
        out_size = self._output_size(size)
        if self.decoder == "decord":
            try:
                return self._decord_frames(idx, out_size)
            except MediaError as e:
                self.warnings.append(str(e))
                self.decoder = "pyav"
        return self._pyav_frames(idx, out_size)

    def frames_near(self, indices: Sequence[int], size: tuple[int, int] | None = None, near: int = 1) -> tuple[np.ndarray, list[int]]:
        """Like ``frames``, but each frame may come from the nearest *reference* frame at most
        ``near`` positions away, so the decoder skips the frames no other frame refers to (the
        non-reference B-frames of most web encodes: half of x264 veryfast's frames, half the
        decode time). Deterministic for a file. Returns (uint8 (T, H, W, 3), positions served);
        a request with no reference frame that close is decoded exactly. ``near=0``: ``frames``."""
        idx = self._checked(indices)
        if near <= 0:
            return self.frames(idx, size), idx
        out_size = self._output_size(size)
        ctx = self._stream.codec_context
        ctx.skip_frame = "NONREF"
        try:
            served = self._pyav_near(sorted(set(idx)), out_size, near)
        finally:
            ctx.skip_frame = "DEFAULT"
        exact = sorted(set(idx) - set(served))
        if exact:
            for i, frame in zip(exact, self.frames(exact, size)):
                served[i] = (i, frame)
        self.decoder = "pyav"
        return np.stack([served[i][1] for i in idx]), [served[i][0] for i in idx]

    def _pyav_near(self, targets: list[int], size: tuple[int, int], near: int) -> dict[int, tuple[int, np.ndarray]]:
        """target -> (position, frame) for the targets that have a decoded frame within ``near``.
        Decodes forward, seeking to a keyframe only when it is ahead of the decoder."""
        index = self._packet_index()
        stored = (size[1], size[0]) if self.rotation in (90, 270) else size
        recent: dict[int, av.VideoFrame] = {}  # decoded frames that a later target may still use
        served: dict[int, tuple[int, np.ndarray]] = {}
        decoded: Iterator[tuple[int, av.VideoFrame]] | None = None
        pos, ended = -1, False  # ended: the stream is exhausted (later targets use what is left)
        for t in targets:
            lo, hi = t - near, t + near
            recent = {i: f for i, f in recent.items() if i >= lo}
            key = index.keyframe_before(max(lo, 0))
            if not ended and (decoded is None or key > pos):
                decoded, recent = self._decode_from(index, key), {}
            while not ended and pos < hi and t not in recent:
                step = next(decoded, None)
                if step is None:
                    ended = True
                    break
                pos, frame = step
                if pos >= lo:
                    recent[pos] = frame
            if recent:  # nearest, preferring a frame no earlier target took; ties: the earlier one
                taken = {p for p, _ in served.values()}
                best = min(recent, key=lambda i: (i in taken, abs(i - t), i))
                if abs(best - t) <= near:
                    served[t] = (best, self._rgb(recent[best], stored))
                    if recent[best].is_corrupt:
                        self.warnings.append(f"frame {best} decoded with errors (concealed by the decoder)")
        return served

    def _rgb(self, frame: av.VideoFrame, stored: tuple[int, int]) -> np.ndarray:
        """A decoded frame at the decoder's (h, w) ``stored``, turned to its displayed orientation."""
        return np.rot90(frame.to_ndarray(width=stored[1], height=stored[0], format="rgb24"), self.rotation // 90)

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

    def _decord_frames(self, idx: list[int], size: tuple[int, int]) -> np.ndarray:
        try:
            batch = self._decord_at(size).get_batch(idx).asnumpy()
        except MediaError:
            raise
        except Exception as e:  # DECORDError, DECORDLimitReachedError (frames it would duplicate)
            raise MediaError(f"decord failed ({_first_line(e)}); decoded with PyAV") from e
        if batch.shape != (len(idx), size[0], size[1], 3):
            raise MediaError(f"decord returned frames of shape {batch.shape[1:]}; decoded with PyAV")
        return batch

    def _pyav_frames(self, idx: list[int], size: tuple[int, int]) -> np.ndarray:
        index = self._packet_index()
        wanted = set(i for i in idx if i < index.n_frames)
        got: dict[int, np.ndarray] = {}
        corrupt: list[int] = []
        stored = (size[1], size[0]) if self.rotation in (90, 270) else size  # decoder's (h, w)
        decoded: Iterator[tuple[int, av.VideoFrame]] | None = None
        pos = -1  # index of the last frame decoded, -1 before any
        for target in sorted(wanted):
            if target in got:
                continue
            key = index.keyframe_before(target)
            if decoded is None or target <= pos or key > pos:
                decoded = self._decode_from(index, key)
            for i, frame in decoded:
                pos = i
                if i in wanted and i not in got:
                    got[i] = self._rgb(frame, stored)
                    corrupt += [i] if frame.is_corrupt else []
                if i >= target:
                    break
            else:
                decoded, pos = None, -1
        if not got:
            raise MediaError("no frame of the video could be decoded")
        missing = sorted(set(idx) - set(got))
        if missing:
            self.warnings.append(f"frames {_span(missing)} could not be decoded; the nearest decoded frames stand in")
        if corrupt:
            self.warnings.append(f"frames {_span(corrupt)} decoded with errors (concealed by the decoder)")
        have = sorted(got)
        return np.stack([got[i] if i in got else got[_nearest(have, i)] for i in idx])

    def _decode_from(self, index: _PacketIndex, key: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """Seek to the keyframe at position ``key`` and yield (position, frame) onwards; packets
        that fail to decode are skipped (their frames then show up as missing)."""
        self._container.seek(index.pts[key], stream=self._stream, backward=True, any_frame=False)
        packets = self._container.demux(self._stream)
        pos = key - 1
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError:  # damaged container (e.g. truncated mid-stream)
                return
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
        self._decord = {}
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()
        self._file.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PacketIndex:
    """Presentation order of the video packets: frame position <-> pts, and keyframe positions.
    Built by demuxing (no decoding), like decord's own index, so counts are exact."""

    def __init__(self, pts: list[int], keys: list[int]):
        self.pts = sorted(pts)
        self._position = {p: i for i, p in enumerate(self.pts)}
        self.keys = sorted({self._position[k] for k in keys}) or [0]
        self.n_frames = len(self.pts)

    @classmethod
    def build(cls, container: Any, stream: Any, warnings: list[str]) -> _PacketIndex:
        pts: list[int] = []
        keys: list[int] = []
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
        except av.error.FFmpegError as e:
            warnings.append(f"container damaged after {len(pts)} frames ({_av_reason(e)})")
        if stream.frames and stream.frames > len(pts):
            warnings.append(f"the header promises {stream.frames} frames but the file holds {len(pts)} (truncated?)")
        return cls(pts, keys)

    def keyframe_before(self, position: int) -> int:
        return self.keys[max(0, bisect.bisect_right(self.keys, position) - 1)]

    def position(self, pts: int | None, default: int) -> int:
        return self._position.get(pts, default) if pts is not None else default


def _ascii_safe_path(path: str, fd: int) -> str | None:
    """decord only takes UTF-8 paths: undecodable names go through the open descriptor."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        proc = f"/proc/self/fd/{fd}"
        return proc if os.path.exists(proc) else None


def _av_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _first_line(e: Exception) -> str:
    """decord's message without its '[hh:mm:ss] /source/file.cc:123: ' prefixes."""
    lines = str(e).strip().splitlines()
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else type(e).__name__
    return text[:160]


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
