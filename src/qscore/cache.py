"""Arrays kept between runs by content key: what a model's cacheable device-side step
(``Model.precompute``; RSFIQA's label maps and region descriptions) found, as ``.npz`` files.

The runner and the training loop write entries (``keep``), right after the step; preparers read
them back in CPU workers (``load``), so a file is worked on once across runs and epochs. A model
never writes one itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from qscore.fsutil import atomic_file

log = logging.getLogger("qscore")


class ArrayCache:
    """Entries under ``root``, one ``.npz`` per key. The key hashes an image's pixels together
    with ``salt`` (everything else that changes the result: weights, rules, working size), so a
    changed setting never reads a stale entry."""

    def __init__(self, root: str | os.PathLike, salt: str = ""):
        self.root = Path(root)
        self.salt = salt

    def key(self, image: np.ndarray) -> str:
        digest = hashlib.sha256(self.salt.encode())
        digest.update(repr(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):
            return None  # a torn or foreign file counts as a miss and is rewritten

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Written to a temp file in the same folder, then renamed: readers never see half an entry."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, suffix=".tmp") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def keep(self, entries: dict[str, dict[str, np.ndarray]]) -> None:
        """Save ``entries`` (key -> arrays); one that cannot be written is only logged: the
        scores do not depend on it, the next run recomputes it."""
        for key, arrays in entries.items():
            try:
                self.save(key, arrays)
            except OSError as e:
                log.warning("cannot write cache entry under %s: %s", self.root, e.strerror or e)
