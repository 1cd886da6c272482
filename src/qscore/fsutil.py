"""File-system helpers every part may use (it imports nothing from qscore)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, suffix: str = ".part", private: bool = True) -> Iterator[Path]:
    """``with atomic_file(dest) as tmp:`` write ``tmp`` (a hidden name in the same folder, ending
    in ``suffix``); it becomes ``dest`` by one rename on success and is removed on failure, so a
    reader never sees a torn ``dest``.

    ``private``: ``tmp`` is made by ``mkstemp`` (an empty file, owner-only permissions, which
    ``dest`` keeps). Otherwise ``tmp`` is a unique name the writer creates, so ``dest`` gets the
    permissions of a plain ``open()`` (the umask): what run outputs and generated data use.
    """
    dest = Path(dest)
    if private:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
