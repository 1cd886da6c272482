"""Label files -> Items and targets for `qscore train` / `qscore eval`.

Accepted formats (comma-separated; blank lines and lines starting with ``#`` are skipped):

- quality, with a header: a path column (``path``, ``filename``, ``file`` or ``name``) and a
  score column (``mos``, ``score`` or ``label``); other columns are ignored.
- quality, headerless: ``path,mos`` or FAST-VQA's ``filename,duration,fps,MOS``.
- forgery: ``forged,reference,mask`` (header optional). ``reference`` and ``mask`` may be empty;
  an empty mask means an authentic image (target 0), otherwise the target is 1.

Relative paths are taken from ``root`` (default: the label file's folder).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qscore.types import Item

PATH_COLUMNS = ("path", "filename", "file", "name")
SCORE_COLUMNS = ("mos", "score", "label")
FORGERY_COLUMNS = ("forged", "reference", "mask")
HEADER_WORDS = {*PATH_COLUMNS, *SCORE_COLUMNS, *FORGERY_COLUMNS, "duration", "fps"}


class LabelError(ValueError):
    """A label file that cannot be used (exit code 2 in the CLI)."""


@dataclass(frozen=True)
class Labels:
    """Items and targets (N,) float32; ``digest``: sha256 of the rows, recorded in the card."""

    items: list[Item]
    targets: np.ndarray
    digest: str

    def __len__(self) -> int:
        return len(self.items)


def read_labels(path: str | os.PathLike, task: str, root: str | os.PathLike | None = None) -> Labels:
    """Parse a label file for a model of ``task`` ("image", "video" or "forgery")."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f) if r and any(r) and not r[0].lstrip().startswith("#")]
    except OSError as e:
        raise LabelError(f"cannot read labels {path}: {e.strerror or e}") from e
    if not rows:
        raise LabelError(f"{path}: no rows")
    header = [c.lower() for c in rows[0]] if HEADER_WORDS & {c.lower() for c in rows[0]} else None
    body = rows[1:] if header else rows
    parse = _forgery_row if task == "forgery" else _quality_row
    base = Path(root) if root is not None else path.parent
    items, targets, missing = [], [], []
    for line, row in enumerate(body, start=2 if header else 1):
        try:
            files, target = parse(header, row)
        except (ValueError, IndexError) as e:
            raise LabelError(f"{path}:{line}: {e}") from e
        full = [str(base / f) if f else None for f in files]
        missing += [p for p in full if p and not os.path.isfile(p)]
        if not os.path.isfile(full[0]):
            continue
        st = os.stat(full[0])
        items.append(Item(full[0], files[0], st.st_size, st.st_mtime, *full[1:]))
        targets.append(target)
    if missing:
        raise LabelError(f"{path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]} (see --root)")
    if not items:
        raise LabelError(f"{path}: no rows")
    rows_key = [(it.rel_path, t, it.reference, it.mask) for it, t in zip(items, targets)]
    digest = hashlib.sha256(json.dumps(rows_key).encode()).hexdigest()
    return Labels(items, np.asarray(targets, dtype=np.float32), digest)


def _quality_row(header: list[str] | None, row: list[str]) -> tuple[list[str], float]:
    if header:
        record = dict(zip(header, row))
        path_col = next((c for c in PATH_COLUMNS if c in record), None)
        score_col = next((c for c in SCORE_COLUMNS if c in record), None)
        if path_col is None or score_col is None:
            raise ValueError(f"header needs a path column {PATH_COLUMNS} and a score column {SCORE_COLUMNS}")
        name, score = record[path_col], record[score_col]
    elif len(row) == 2 or len(row) == 4:  # path,mos or FAST-VQA filename,duration,fps,MOS
        name, score = row[0], row[-1]
    else:
        raise ValueError(f"expected path,mos or filename,duration,fps,MOS, got {len(row)} fields")
    try:
        return [name], float(score)
    except ValueError:
        raise ValueError(f"score {score!r} is not a number") from None


def _forgery_row(header: list[str] | None, row: list[str]) -> tuple[list[str], float]:
    if header:
        record = dict(zip(header, row))
        if "forged" not in record and "path" not in record:
            raise ValueError("header needs a forged column (and optional reference, mask)")
        files = [record.get("forged", record.get("path", "")), record.get("reference", ""), record.get("mask", "")]
    else:
        if len(row) > 3:
            raise ValueError(f"expected forged,reference,mask, got {len(row)} fields")
        files = (row + ["", ""])[:3]
    if not files[0]:
        raise ValueError("empty forged path")
    return files, float(bool(files[2]))
