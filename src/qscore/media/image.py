"""Image decoding that never lets a bad file through silently.

Every file becomes either an 8-bit RGB array or a ``MediaError`` with a short, clear reason:
missing, unreadable, empty, text, unknown format, truncated, too large (decompression bomb).
Conversions that change the data (grey, CMYK, palette, 16 bit, alpha, EXIF rotation) are named
in ``decode_warnings`` so a row says how its pixels were obtained.
"""

from __future__ import annotations

import errno
import os
import struct
import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qscore.types import MediaError

MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold (~ 9459 x 9459)
WHITE = 255


def open_file(path: str) -> IO[bytes]:
    """Open ``path`` for reading, turning file-system failures into clear MediaErrors."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise MediaError(_os_reason(e)) from e
    if os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise MediaError("empty file (0 bytes)")
    return f


def _os_reason(e: OSError) -> str:
    reasons = {
        errno.ENOENT: "file not found (it vanished, or is a broken link)",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: "symlink loop",
        errno.EISDIR: "is a folder, not a file",
    }
    return reasons.get(e.errno, f"cannot read file: {e.strerror or e}")


def looks_like_text(head: bytes) -> bool:
    """True when the first bytes are printable UTF-8 text (a log, CSV, HTML page...)."""
    if not head or b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end of ``head``
        if e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")
    return sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * max(len(text), 1)


def load_image(
    path: str, *, max_pixels: int = MAX_PIXELS, max_side: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode ``path`` to RGB.

    Returns ``(pixels, facts)``: pixels uint8 (H, W, 3), EXIF orientation applied; facts has the
    displayed ``width``/``height`` of the file (before any ``max_side`` reduction), ``decoder``
    and ``decode_warnings`` (``None`` or "; "-joined notes). ``max_side`` caps the longer side of
    the returned pixels (aspect kept; JPEG decodes at reduced scale directly).
    """
    notes: list[str] = []
    with open_file(path) as f:
        head = f.read(512)
        f.seek(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below
            img = _open_checked(f, head, max_pixels)
            deep = _rawmode(img).endswith(("16", "16B", "16L"))  # tile info is gone after load
            size = img.size  # before any reduced-scale (draft) decoding
            if max_side:
                _draft(img, max_side)
            try:
                frames = getattr(img, "n_frames", 1)  # counting seeks through the file and back: before
                img.load()  # the load, or an animation's first frame is read after the file is closed
                if frames > 1:
                    notes.append(f"{frames} frames; the first is used")
                img, transposed = _orient(img, notes)
                size = size[::-1] if transposed else size
            except OSError as e:
                msg = str(e)
                if "truncated" in msg:
                    raise MediaError(f"truncated file ({img.format}): {msg}") from e
                raise MediaError(f"corrupt {img.format} data: {msg}") from e
            except (ValueError, SyntaxError, EOFError, MemoryError) as e:
                raise MediaError(f"corrupt {img.format} data: {e}") from e
        notes += [str(w.message) for w in caught]
    img = _to_rgb(img, notes, deep)
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        small = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(small, Image.BILINEAR, reducing_gap=2.0)
    pixels = np.array(img, dtype=np.uint8)  # a writable copy, not a view of Pillow's buffer
    facts = {"width": size[0], "height": size[1], "decoder": "pillow", "decode_warnings": "; ".join(notes) or None}
    return pixels, facts


def load_mask(path: str) -> np.ndarray:
    """A ground-truth forgery mask file (any image, decoded as ``load_image`` does) as bool
    (H, W): a pixel is manipulated when its brightest channel is above 127. So white, grey and
    coloured masks read alike: forgery datasets often mark manipulated pixels pure red
    (255, 0, 0), whose luminance (76) a grey conversion would read as authentic. Training and
    evaluation both read masks here. A bad file: MediaError naming the mask."""
    try:
        pixels, _ = load_image(path)
    except MediaError as e:
        raise MediaError(f"mask {os.path.basename(path)}: {e}") from e
    return pixels.max(axis=2) > 127


def _open_checked(f: IO[bytes], head: bytes, max_pixels: int) -> Image.Image:
    """Identify the format, check the file is whole (PNG chunk CRCs up to IEND) and small enough."""
    try:
        probe = Image.open(f)
        probe.verify()  # structure only, no pixel decoding; a no-op for formats without it
        f.seek(0)
        img = Image.open(f)
    except Image.DecompressionBombError as e:
        raise MediaError(f"image too large (decompression-bomb guard): {e}") from e
    except UnidentifiedImageError as e:
        if looks_like_text(head):
            raise MediaError("not an image: the file holds text") from e
        raise MediaError("not a recognised image format (corrupt, or not an image)") from e
    except OSError as e:
        if "truncated" in str(e).lower():
            raise MediaError(f"truncated file: {e}") from e
        raise MediaError(f"corrupt image: {e}") from e
    except (ValueError, SyntaxError, EOFError, struct.error) as e:
        raise MediaError(f"corrupt image: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise MediaError(
            f"image too large: {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
            "(decompression-bomb guard)"
        )
    if w < 1 or h < 1:
        raise MediaError(f"image has no pixels ({w}x{h})")
    return img


def _draft(img: Image.Image, max_side: int) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale when that still leaves ``max_side`` pixels."""
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        scale = max_side / max(img.size)
        if scale < 1:
            img.draft(img.mode, (int(img.width * scale) + 1, int(img.height * scale) + 1))


def _orient(img: Image.Image, notes: list[str]) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation tag (phones store rotated pixels plus this tag); also say
    whether width and height swapped."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF block: pixels are still fine
        notes.append("unreadable EXIF data ignored")
        return img, False
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        notes.append(f"EXIF orientation {orientation} applied")
        return ImageOps.exif_transpose(img), orientation >= 5
    return img, False


def _to_rgb(img: Image.Image, notes: list[str], deep: bool = False) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; high bit depths are rescaled (not clipped), alpha is
    composited on white. ``deep``: 16-bit colour samples that Pillow already reduced to their
    high byte while decoding."""
    mode = img.mode
    if deep and mode in ("RGB", "RGBA"):
        notes.append(f"16-bit {mode} reduced to 8 bit")
    if mode == "RGB":
        return img
    if mode == "P":
        notes.append("palette image converted to RGB")
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() < 255:
            white = Image.new("RGBA", rgba.size, (WHITE, WHITE, WHITE, 255))
            rgba = Image.alpha_composite(white, rgba)
            notes.append("alpha channel composited on white")
        else:
            notes.append("opaque alpha channel dropped")
        return rgba.convert("RGB")
    if mode.startswith("I") or mode.startswith("F"):
        grey = _to_8bit(np.asarray(img), mode, notes)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if mode in ("L", "1"):
        notes.append("greyscale converted to RGB" if mode == "L" else "1-bit image converted to RGB")
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB")
    else:
        notes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw sample layout, e.g. "RGB;16B" for a 48-bit PNG ("" if unknown)."""
    tile = getattr(img, "tile", None) or []
    args = tile[0][3] if tile else ""
    return args if isinstance(args, str) else ""


def _to_8bit(values: np.ndarray, mode: str, notes: list[str]) -> np.ndarray:
    """Integer/float greyscale -> uint8 by its nominal range: 16 bit / 257, float [0, 1] x 255;
    anything else is min-max stretched (and said so)."""
    v = values.astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    if mode.startswith("F") and lo >= 0 and hi <= 1:
        notes.append("float image scaled from [0, 1] to 8 bit")
        return np.round(v * 255).astype(np.uint8)
    if lo >= 0 and hi <= 65535 and not mode.startswith("F"):
        notes.append("16-bit greyscale reduced to 8 bit")
        return np.round(v / 257).astype(np.uint8)
    notes.append(f"{mode} image stretched from [{lo:g}, {hi:g}] to 8 bit")
    span = hi - lo or 1.0
    return np.round((v - lo) / span * 255).astype(np.uint8)
