"""Turn the PATH arguments into Items: files, folders (recursive), manifests and CIML pairs.

Discovery never opens media; a file it cannot even stat (symlink loop, permission on the folder)
still becomes an Item, with ``error`` set, so it gets its error row like any other bad file.
"""

from __future__ import annotations

import csv
import errno
import os
from dataclasses import replace

from qscore.types import Item, safe_text

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp")
MANIFEST_EXTS = (".txt", ".csv", ".lst")
REF_TAG = ".ref"  # CIML folder convention: <stem>.ref.<ext> is the authentic source of <stem>.<ext>


class DiscoveryError(ValueError):
    """A usage problem with the PATH arguments (exit code 2)."""


def default_exts(task: str) -> tuple[str, ...]:
    return VIDEO_EXTS if task == "video" else IMAGE_EXTS


def discover(
    inputs: list[str],
    task: str,
    exts: tuple[str, ...] | None = None,
    ciml: bool = False,
    pairs: str | None = None,
) -> list[Item]:
    """Items for every input, in a stable order (inputs as given, folders sorted).

    ``rel_path`` is relative to the folder walked (a file given directly: its name; a manifest
    entry: relative to the manifest's folder). Two inputs that map to the same ``rel_path``
    would overwrite each other's row and artefacts, so that is refused.
    """
    check_inputs(inputs, pairs)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in (exts or default_exts(task)))
    found: list[tuple[str, str]] = []  # (path, rel_path)
    if pairs:
        items = _read_pairs(pairs)
    else:
        for arg in inputs:
            found.extend(_expand(arg, exts))
        items = [_item(p, rel) for p, rel in found if not _is_reference(p)]
        if ciml:
            items = [_with_reference(it, exts) for it in items]
    seen: dict[str, str] = {}
    for it in items:
        other = seen.setdefault(it.rel_path, it.path)
        if other != it.path:
            raise DiscoveryError(
                f"{safe_text(other)} and {safe_text(it.path)} both map to {safe_text(it.rel_path)!r}; "
                "score them into separate --out folders"
            )
    return items


def check_inputs(inputs: list[str], pairs: str | None = None) -> None:
    """The PATH problems found without walking anything (the command line checks them before it
    imports torch): a PATH that does not exist, a --pairs that is not a file."""
    for arg in inputs:
        if not os.path.lexists(arg):
            raise DiscoveryError(f"no such file or folder: {safe_text(arg)}")
    if pairs and not os.path.isfile(pairs):
        raise DiscoveryError(f"cannot read --pairs {safe_text(pairs)}: no such file")


def _expand(arg: str, exts: tuple[str, ...]) -> list[tuple[str, str]]:
    if os.path.isdir(arg):
        return _walk(arg, exts)
    if arg.lower().endswith(MANIFEST_EXTS) and os.path.isfile(arg):
        return _read_manifest(arg)
    return [(arg, os.path.basename(arg))]


def _walk(root: str, exts: tuple[str, ...]) -> list[tuple[str, str]]:
    """Recursive walk; symlinked folders are not followed (no loops), symlinked files are."""
    out = []
    for folder, dirs, files in os.walk(root, onerror=None, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(exts):
                path = os.path.join(folder, name)
                out.append((path, os.path.relpath(path, root)))
    return out


def _read_manifest(manifest: str) -> list[tuple[str, str]]:
    """One path per line (.txt/.lst) or a CSV with a ``path`` column (else its first column);
    relative paths are relative to the manifest's folder."""
    base = os.path.dirname(os.path.abspath(manifest))
    with open(manifest, newline="", encoding="utf-8", errors="surrogateescape") as f:
        if manifest.lower().endswith(".csv"):
            rows = list(csv.reader(f))
            header = [h.strip().lower() for h in rows[0]] if rows else []
            col = header.index("path") if "path" in header else 0
            entries = [r[col] for r in rows[1 if "path" in header else 0 :] if r and r[col].strip()]
        else:
            entries = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    out = []
    for entry in entries:
        path = entry if os.path.isabs(entry) else os.path.join(base, entry)
        out.append((path, _relative(path, base)))
    return out


def _relative(path: str, base: str) -> str:
    """A manifest entry's ``rel_path``: relative to the manifest's folder, or for a file outside
    it the absolute path without its leading separator, so artefacts stay under --out."""
    rel = os.path.relpath(path, base)
    return rel if not rel.startswith("..") else os.path.abspath(path).lstrip(os.sep)


def _read_pairs(pairs_csv: str) -> list[Item]:
    """``--pairs CSV`` with columns forged,reference (relative to the CSV's folder)."""
    base = os.path.dirname(os.path.abspath(pairs_csv))
    try:
        with open(pairs_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DiscoveryError(f"cannot read --pairs {pairs_csv}: {e.strerror}") from e
    if not rows or not {"forged", "reference"} <= set(rows[0]):
        raise DiscoveryError(f"--pairs {pairs_csv} needs a header with columns forged,reference")
    items = []
    for row in rows:
        forged = os.path.join(base, row["forged"].strip())
        ref = (row["reference"] or "").strip()
        item = _item(forged, _relative(forged, base))
        if not ref:
            item = replace(item, error="no reference given for this image in --pairs")
        else:
            item = replace(item, reference=os.path.join(base, ref))
        items.append(item)
    return items


def _is_reference(path: str) -> bool:
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.lower().endswith(REF_TAG)


def _with_reference(item: Item, exts: tuple[str, ...]) -> Item:
    """Attach ``<stem>.ref.<ext>`` (any image extension) from beside the forged image."""
    stem = os.path.splitext(item.path)[0]
    for ext in exts:
        for candidate in (stem + REF_TAG + ext, stem + REF_TAG + ext.upper()):
            if os.path.lexists(candidate):
                return replace(item, reference=candidate)
    if item.error:
        return item
    name = os.path.basename(stem) + REF_TAG + ".<ext>"
    return replace(item, error=f"no reference image found: expected {name} beside it (or use --pairs)")


def _item(path: str, rel: str) -> Item:
    try:
        st = os.stat(path)
        return Item(path=path, rel_path=rel, size=st.st_size, mtime=st.st_mtime)
    except OSError as e:
        reason = "symlink loop" if e.errno == errno.ELOOP else (e.strerror or str(e))
        return Item(path=path, rel_path=rel, size=0, mtime=0.0, error=f"cannot stat file: {reason}")


