"""``--engine ray`` on a local Ray (2 CPUs, one module-wide session): the same rows as the local
runner, resume after a killed driver, and Ray workers that die mid-run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.test_runner import ROOT, TOY, kill_mid_run, make_images, qscore, table

ray = pytest.importorskip("ray")

SHARED = ROOT.parent / "shared" / "data"
VARIES = ["scored_at", "decode_ms", "model_ms"]  # timings: the only columns two runs may differ in


@pytest.fixture(scope="module")
def address():
    """One Ray session for the module (its start costs seconds); qscore runs in this process use it."""
    env = {"QSCORE_EXTRA_MODELS": TOY, "PYTHONPATH": str(ROOT)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, runtime_env={"env_vars": env})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True)
def toy_model(monkeypatch):
    monkeypatch.setenv("QSCORE_EXTRA_MODELS", TOY)


def both(tmp_path: Path, *args) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The same run under both engines: (local rows, ray rows, ray exit code)."""
    codes = []
    for engine in ("local", "ray"):
        code, output = qscore(*args, "-o", tmp_path / engine, "--engine", engine, "-q")
        assert code in (0, 1), output
        codes.append(code)
    assert codes[0] == codes[1]
    stem = next(p.stem for p in (tmp_path / "local").glob("*.parquet"))
    return table(tmp_path / "local", stem), table(tmp_path / "ray", stem), codes[1]


def assert_same(local: pd.DataFrame, other: pd.DataFrame) -> None:
    assert list(local.columns) == list(other.columns)
    pd.testing.assert_frame_equal(local.drop(columns=VARIES), other.drop(columns=VARIES))


@pytest.mark.skipif(not (SHARED / "video").is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("command, model, inputs", [
    ("image", "rsfiqa", [SHARED / "pristine" / "kodak" / f"kodim0{i}.png" for i in (1, 2, 3)]),
    ("video", "clifvqa", [SHARED / "video"]),
])
def test_rows_equal_the_local_runners_on_the_shared_photos_and_clips(address, tmp_path, command, model, inputs):
    local, other, _ = both(tmp_path, command, *inputs, "-m", model, "--preset", "tiny", "--weights", "random", "-b", "2")
    assert (local.status == "ok").all() and len(local) == len(other)
    assert_same(local, other)
    for path in other.heatmap_path.dropna():
        assert (tmp_path / "ray" / path).read_bytes() == (tmp_path / "local" / path).read_bytes()
    summary = json.loads((tmp_path / "ray" / f"{model}.summary.json").read_text())
    assert summary["engine"] == "ray" and summary["workers"][0]["files"] == len(other) and summary["files_per_s"]
    assert summary["workers"][0]["build_s"] > 0 and 0 <= summary["ray"]["connect_s"] <= summary["ray"]["workers_ready_s"]


def test_bad_files_give_the_local_runners_error_rows(address, tmp_path):
    from tests.badmedia import make_bad_media

    make_bad_media(tmp_path / "media")
    local, other, code = both(tmp_path, "image", tmp_path / "media", "-m", "toy", "-j", "0")
    assert code == 1 and (other.status == "error").any()
    assert_same(local, other)


def scorers() -> list[int]:
    """Pids of this test's Ray scoring actors (descendants of this process, by their title)."""
    children: dict[int, list[int]] = {}
    titles = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    mine, todo = [], [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            mine.append(pid)
    return [pid for pid in mine if titles.get(pid, b"").startswith(b"ray::_Scorer")]


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(address, tmp_path):
    make_images(tmp_path / "in", 16)
    out, killed = tmp_path / "out", []

    def kill_once() -> None:
        parts = out / ".parts" / "toy"
        deadline = time.time() + 120
        while time.time() < deadline and len(list(parts.glob("part-*.parquet")) if parts.exists() else []) < 2:
            time.sleep(0.1)
        for pid in scorers():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_once)
    killer.start()
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-b", "2", "--set", "delay=0.3",
                          "--engine", "ray", "-q")
    killer.join()
    assert killed and code == 0, output
    df = table(out)
    assert len(df) == 16 and df.rel_path.is_unique and (df.status == "ok").all()
    worker = json.loads((out / "toy.summary.json").read_text())["workers"][0]
    assert worker["deaths"] >= 1


def test_a_file_that_kills_its_worker_twice_gets_an_error_row(address, tmp_path):
    make_images(tmp_path / "in", 6)
    out = tmp_path / "out"
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-b", "3", "--set", "die_name=img004",
                          "--engine", "ray", "-q")
    assert code == 1, output
    df = table(out).set_index("rel_path")
    assert len(df) == 6 and (df.drop(index="img004.png").status == "ok").all()
    assert df.loc["img004.png", "error"].startswith("WorkerDied: its Ray worker died 2 times")


def test_a_killed_driver_reruns_without_loss_or_duplicates(address, tmp_path):
    """The driver joins the module's cluster with --ray-address, as a cron job joins a cluster's."""
    make_images(tmp_path / "in", 24)
    out = tmp_path / "out"
    env = {**os.environ, "QSCORE_EXTRA_MODELS": TOY, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "qscore", "image", str(tmp_path / "in"), "-m", "toy", "-o", str(out), "-b", "2",
           "--set", "delay=0.3", "--engine", "ray", "--ray-address", address, "-q"]
    kill_mid_run(cmd, env, out, wait_s=120)
    rerun = subprocess.run(cmd, env=env, cwd=ROOT, timeout=300)
    assert rerun.returncode == 0
    df = table(out)
    assert len(df) == 24 and df.rel_path.is_unique and (df.status == "ok").all()
    assert json.loads((out / "toy.summary.json").read_text())["skipped"] >= 3 * 2


def test_a_ray_it_starts_gives_its_workers_the_drivers_environment(tmp_path):
    """Without --ray-address qscore starts its own Ray, passing no runtime env: the workers find
    the toy model only through the driver's inherited QSCORE_EXTRA_MODELS and PYTHONPATH."""
    make_images(tmp_path / "in", 4)
    out = tmp_path / "out"
    env = {**os.environ, "QSCORE_EXTRA_MODELS": TOY, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "qscore", "image", str(tmp_path / "in"), "-m", "toy", "-o", str(out), "-b", "2",
           "--engine", "ray", "-q"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "toy.summary.json").read_text())
    assert summary["ok"] == 4 and summary["workers"][0]["files"] == 4 and summary["ray"]["connect_s"] > 0
