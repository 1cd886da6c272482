"""Generators of good, bad and edge-case media files for the decode tests and the end-to-end run.

``make_bad_media(folder)`` writes one file per case and returns {file name: "ok" | "error"}, the
status a run over the folder must give each file. Everything is small and made in well under a
second; nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import av
import numpy as np
from PIL import Image

BOMB_SIDE = 10_000  # 10k x 10k = 1e8 pixels, above the default limit of ~8.9e7


def gradient(h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3): red = column, green = row, blue constant; every pixel tells its place."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (np.arange(w) * 255 // max(w - 1, 1))[None, :]
    img[..., 1] = (np.arange(h) * 255 // max(h - 1, 1))[:, None]
    img[..., 2] = 90
    return img


def jpeg_bytes(img: np.ndarray | Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def png_bytes(img: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, "PNG")
    return buf.getvalue()


def _png(width: int, height: int, bits: int, colour: int, idat: bytes) -> bytes:
    """A PNG file from its IHDR fields and compressed image data (Pillow cannot write these)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: 1e8 pixels in about 15 kB."""
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row * 1000) for _ in range(side // 1000)) + z.flush()
    return _png(side, side, 1, 0, data)


def png16_rgb(rgb: np.ndarray) -> bytes:
    """A 48-bit RGB PNG from uint16 (h, w, 3)."""
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.astype(">u2").view(np.uint8).reshape(h, -1)], axis=1)
    return _png(w, h, 16, 2, zlib.compress(rows.tobytes()))


def exif_rotated_jpeg(h: int = 20, w: int = 40, orientation: int = 6) -> bytes:
    """A w x h JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(gradient(h, w), exif=exif.tobytes())


def make_video(
    path: str | os.PathLike,
    n: int = 30,
    size: tuple[int, int] = (48, 64),
    codec: str = "libx264",
    fps: int = 30,
    faststart: bool = False,
    rotation: int = 0,
    frame: Callable[[int], np.ndarray] | None = None,
    gop: int = 10,
    bframes: int | None = None,
) -> Path:
    """Encode n frames (``frame(i)`` -> uint8 (h, w, 3); default: a gradient with a moving bar);
    a keyframe every ``gop``, ``bframes`` B-frames at most in a row (None: the encoder's default)."""
    h, w = size

    def default(i: int) -> np.ndarray:
        img = gradient(h, w)
        img[:, (i * 2) % w] = 255
        return img

    make = frame or default
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream(codec, rate=fps, options={"g": str(gop), **({"bf": str(bframes)} if bframes is not None else {})})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(make(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)


def make_audio_only(path: str | os.PathLike, seconds: float = 0.5) -> Path:
    """An MP4 holding one AAC audio stream and no video."""
    rate = 44_100
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        t = np.arange(int(rate * seconds)) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)


def noisy_video(path: str | os.PathLike, n: int = 60, faststart: bool = True) -> Path:
    """128x96 noise frames: every frame is a large packet, so cutting or zeroing bytes hits
    frame data (a smooth tiny video is mostly header)."""
    rng = np.random.default_rng(0)
    return make_video(path, n=n, size=(96, 128), faststart=faststart,
                      frame=lambda i: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))


def truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def make_bad_media(folder: str | os.PathLike) -> dict[str, str]:
    """Write every bad and edge case into ``folder`` (flat); return {name: expected status}."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, status: str) -> Path:
        (root / name).write_bytes(data)
        expected[name] = status
        return root / name

    rng = np.random.default_rng(7)
    photo = gradient(48, 64)
    put("good.jpg", jpeg_bytes(photo), "ok")
    put("good.png", png_bytes(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "ok")
    put("one_pixel.png", png_bytes(np.full((1, 1, 3), 200, np.uint8)), "ok")
    put("grey.png", png_bytes(photo[..., 0]), "ok")
    put("cmyk.jpg", jpeg_bytes(Image.fromarray(photo).convert("CMYK")), "ok")
    put("deep16.png", png_bytes(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16))), "ok")
    put("deep48.png", png16_rgb(photo.astype(np.uint16) * 257), "ok")
    put("alpha.png", png_bytes(np.dstack([photo, np.full((48, 64), 128, np.uint8)])), "ok")
    put("palette.png", png_bytes(Image.fromarray(photo).convert("P")), "ok")
    put("exif_rotated.jpg", exif_rotated_jpeg(), "ok")
    put(os.fsdecode(b"bad\xff-name.jpg"), jpeg_bytes(photo), "ok")

    put("empty.jpg", b"", "error")
    good_jpeg, good_png = jpeg_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), png_bytes(photo)
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "error")
    put("truncated.png", good_png[: len(good_png) * 2 // 3], "error")
    put("random_bytes.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "error")
    put("text.png", b"this is a log file, not an image\n" * 20, "error")
    put("bomb.png", bomb_png(), "error")

    loop = root / "symlink_loop.jpg"
    os.symlink(loop.name, loop)  # points at itself
    expected[loop.name] = "error"
    gone = root / "vanished.jpg"
    os.symlink("deleted-before-the-run.jpg", gone)  # the target vanished
    expected[gone.name] = "error"
    locked = put("unreadable.png", png_bytes(photo), "error")
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads it anyway
        expected[locked.name] = "ok"

    put("animated.gif", gif_bytes([gradient(24, 32), 255 - gradient(24, 32)]), "ok")  # the first frame
    put("png_named.jpg", png_bytes(photo), "ok")  # wrong extension, readable content
    for odd in ("with space.png", "ünï cøde 名前.png", "new\nline.png", "-dash-first.png", "#hash;semi.png"):
        put(odd, png_bytes(photo), "ok")
    (root / "album.jpg").mkdir()  # a folder named like an image: walked, not scored
    put("album.jpg/inside.png", png_bytes(photo), "ok")

    make_video(root / "good.mp4")
    expected["good.mp4"] = "ok"
    make_video(root / "one_frame.mp4", n=1)
    expected["one_frame.mp4"] = "ok"
    make_video(root / "odd name ü.mp4")
    expected["odd name ü.mp4"] = "ok"
    put("empty.mp4", b"", "error")
    put("text.mp4", b"not a video, just text\n" * 40, "error")
    put("jpeg_named.mp4", good_jpeg, "ok")  # wrong extension: FFmpeg reads a JPEG as a one-frame video
    put("video_named.jpg", (root / "good.mp4").read_bytes(), "error")  # wrong extension: a video
    truncate(make_video(root / "truncated.mp4", n=60), 0.6)  # index at the end: cut away
    expected["truncated.mp4"] = "error"
    make_audio_only(root / "audio_only.mp4")
    expected["audio_only.mp4"] = "error"
    video_loop = root / "symlink_loop.mp4"
    os.symlink(video_loop.name, video_loop)
    expected[video_loop.name] = "error"
    locked_video = make_video(root / "unreadable.mp4")
    locked_video.chmod(0)
    expected[locked_video.name] = "error" if not os.access(locked_video, os.R_OK) else "ok"
    return expected


def gif_bytes(frames: list[np.ndarray]) -> bytes:
    """An animated GIF of the given uint8 (h, w, 3) frames."""
    buf = io.BytesIO()
    first, *rest = (Image.fromarray(f) for f in frames)
    first.save(buf, "GIF", save_all=True, append_images=rest, duration=100, loop=0)
    return buf.getvalue()
