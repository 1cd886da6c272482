"""What discovery hands over: one ``Item`` per file. Plain Python, so the command line can check
its inputs before torch is imported."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    """One file to score, as discovery found it. ``path`` is the real file-system path (it may
    hold undecodable bytes as surrogates); ``display`` is the same path safe for Parquet/logs."""

    path: str
    rel_path: str
    size: int
    mtime: float
    reference: str | None = None  # CIML: the authentic source image
    mask: str | None = None  # training only: ground-truth forgery mask
    error: str | None = None  # discovery already knows this file is bad (e.g. symlink loop)

    @property
    def display(self) -> str:
        return safe_text(self.path)

    def seed(self, run_seed: int = 0) -> int:
        """A 63-bit seed fixed by the file (relative path and size) and the run's --seed."""
        key = f"{safe_text(self.rel_path)}\0{self.size}\0{run_seed}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def safe_text(s: str) -> str:
    """A str that encodes as UTF-8: undecodable file-name bytes become \\xNN escapes."""
    return os.fsencode(s).decode("utf-8", "backslashreplace")
