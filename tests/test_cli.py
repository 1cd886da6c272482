"""The command line as a new user meets it: fast usage errors, help, tables that keep their
keys whole, random weights that say so."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from qscore import registry
from qscore.cli import app

ROOT = Path(__file__).resolve().parents[1]


def qscore(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "80"})
    return result.exit_code, result.output


def test_usage_errors_come_before_torch_is_imported(tmp_path):
    """Checking the arguments imports neither torch nor a model (that alone took 16-27 s on a
    cold cache); the whole command answers in well under 3 s."""
    probe = (
        "import sys\n"
        "from qscore.cli import app\n"
        "for args in (['video', 'nothere', '--model', 'mvqa'], ['video', '.', '--model', 'nosuch'],\n"
        "             ['video', '.', '--weights', 'missing.safetensors'], ['image', '.', '--set', 'nope']):\n"
        "    try:\n"
        "        app(args, prog_name='qscore')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 2, (args, e.code)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert time.perf_counter() - start < 3
    assert "no such file or folder: nothere" in run.stderr and "unknown model 'nosuch'" in run.stderr
    assert "--weights missing.safetensors: no such file" in run.stderr and "--set expects KEY=VALUE" in run.stderr


def test_a_group_without_a_command_shows_its_help_and_exits_0():
    for args in ((), ("weights",)):
        code, output = qscore(*args)
        assert code == 0 and "Usage:" in output and "list" in output, args
    code, output = qscore("image")  # a command missing its PATH is a usage error
    assert code == 2 and "Usage:" in output


def test_tables_keep_keys_whole_at_80_columns():
    from qscore.weights import Registry

    code, output = qscore("weights", "list")
    assert code == 0 and "…" not in output
    cells = {cell.strip() for line in output.splitlines() for cell in line.split("│")}
    assert set(Registry.load().keys()) <= cells  # each key whole in its cell: `weights pull` takes it
    code, output = qscore("models")
    assert code == 0
    keys = {k for name in registry.names() for k in Registry.load().used_by(name)}
    cells = {cell.strip() for line in output.splitlines() for cell in line.split("│")}
    assert keys <= cells


def test_score_ranges_say_what_random_weights_give():
    """A documented range holds with random weights (bounded by construction: rsfiqa's sigmoid,
    ugdiml's clamped mask probabilities; their tests check it) or the range says it does not."""
    for name in registry.names():
        spec = registry.get(name).spec
        assert spec.score_range.startswith("[0, 1]") or "random" in spec.score_range or "unbounded" in spec.score_range, name


def test_usable_cpus_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    from qscore import cpus

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert cpus._cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpus._cgroup_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus._cgroup_quota(tmp_path / "v1") == 2.0
    assert cpus._cgroup_quota(tmp_path / "none") is None
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)))  # a big host
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 1.5)
    assert cpus.usable_cpus() == 2
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    assert cpus.usable_cpus() == 64
