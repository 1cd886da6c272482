"""The types and errors every part shares: what discovery finds (``Item``), what a worker hands
the main process (``Sample``), what a model returns per file (``Output``), and the errors that
cross part boundaries. This module imports nothing from qscore, so any part may import it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch


class MediaError(Exception):
    """A file that cannot be decoded or sampled; the message becomes the row's ``error``."""


class UsageError(Exception):
    """Bad options, unknown model, missing weights, unwritable output: exit code 2."""


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


@dataclass
class Sample:
    """What a worker hands to the main process for one file.

    ``inputs``: tensors for ``collate`` (per file, no batch dim). ``facts``: media columns
    (width, height, n_frames, fps, duration_s, frames_used, decoder, decode_warnings, decode_ms).
    ``keep``: CPU-side things ``postprocess`` needs (original size, a preview frame for an
    overlay, ...).
    """

    item: Item
    inputs: dict[str, torch.Tensor]
    facts: dict[str, Any] = field(default_factory=dict)
    keep: dict[str, Any] = field(default_factory=dict)


@dataclass
class Output:
    """One file's result: row ``columns`` (``score`` and the model's own columns) and artefact
    images keyed by kind ("heatmap", "mask", "uncertainty"): uint8 (H, W) or (H, W, 3)."""

    columns: dict[str, Any]
    artefacts: dict[str, np.ndarray] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # float maps for optional .npz


class MissingWeights(RuntimeError):
    """A weights file the run needs is not available; the CLI turns it into exit code 2."""
