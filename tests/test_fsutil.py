"""The one temp-file-then-rename helper: what a reader of ``dest`` can see, and the permissions."""

from __future__ import annotations

import os
import stat

import pytest

from qscore.fsutil import atomic_file


@pytest.mark.parametrize("private", [True, False])
def test_atomic_file_renames_in_on_success_and_leaves_nothing_on_failure(tmp_path, private):
    dest = tmp_path / "out.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(dest, private=private) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.json.") and tmp.name.endswith(".part")
            tmp.write_text("torn")
            raise RuntimeError("killed mid-write")
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with atomic_file(dest, suffix=".tmp.npz", private=private) as tmp:
        assert tmp.name.endswith(".tmp.npz")
        tmp.write_text("new")
    assert dest.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_private_files_are_owner_only_others_follow_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "weights.bin") as tmp:
            tmp.write_bytes(b"w")
        with atomic_file(tmp_path / "table.parquet", private=False) as tmp:
            tmp.write_bytes(b"t")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "weights.bin").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "table.parquet").stat().st_mode) == 0o644
