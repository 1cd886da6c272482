"""End to end through the CLI and runner with a test-only model (tests/toymodel.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from qscore.cli import app
from qscore.runner import chunk_size

ROOT = Path(__file__).resolve().parents[1]
TOY = "toy=tests.toymodel:Toy"


@pytest.fixture(autouse=True)
def toy_model(monkeypatch):
    monkeypatch.setenv("QSCORE_EXTRA_MODELS", TOY)


def qscore(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def kill_mid_run(cmd: list[str], env: dict, out: Path, wait_s: float) -> subprocess.Popen:
    """Start a toy run of 24 files in batches of 2, kill -9 it once 3 Parquet parts are written,
    and check that the kill landed mid-run (fewer than 12 parts)."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    parts = out / ".parts" / "toy"
    deadline = time.time() + wait_s
    while time.time() < deadline and len(list(parts.glob("part-*.parquet")) if parts.exists() else []) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(list(parts.glob("part-*.parquet"))) < 12, "the kill should land mid-run"
    return proc


def make_images(folder: Path, n: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / ("sub" if i % 2 else "") / f"img{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def table(out: Path, stem: str = "toy") -> pd.DataFrame:
    return pq.read_table(out / f"{stem}.parquet").to_pandas()


def test_bad_media_folder_end_to_end(tmp_path):
    from tests.badmedia import make_bad_media

    media = tmp_path / "media"
    expected = make_bad_media(media)
    out = tmp_path / "out"
    code, output = qscore("image", media, "--model", "toy", "--out", out, "--workers", "0", "--csv")
    assert code == 1, output  # some files failed
    df = table(out)
    assert df.rel_path.is_unique
    images = {k: v for k, v in expected.items() if not k.endswith(".mp4")}
    assert len(df) == len(images)  # every file one row, and nothing else
    by_rel = {r.rel_path: r for r in df.itertuples()}
    for name, want in images.items():
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        row = by_rel.get(shown)
        assert row is not None, f"no row for {shown!r}: {sorted(by_rel)}"
        assert row.status == want, (shown, row.error)
        if want == "error":
            assert row.error and ":" in row.error and np.isnan(row.score)
        else:
            assert 0.0 <= row.score <= 1.0 and row.width > 0
            assert (out / row.heatmap_path).is_file()
    csv = pd.read_csv(out / "toy.csv")
    assert len(csv) == len(df)
    summary = json.loads((out / "toy.summary.json").read_text())
    assert summary["ok"] + summary["error"] == len(df) and summary["exit_code"] == 1

    # resume: ok rows are skipped, failed ones retried; no duplicate rows either way
    code, _ = qscore("image", media, "--model", "toy", "--out", out, "--workers", "0")
    again = json.loads((out / "toy.summary.json").read_text())
    assert again["skipped"] == summary["ok"] and again["ok"] == 0
    assert len(table(out)) == len(df)
    code, _ = qscore("image", media, "--model", "toy", "--out", out, "--workers", "0", "--force")
    forced = json.loads((out / "toy.summary.json").read_text())
    assert forced["skipped"] == 0 and forced["ok"] == summary["ok"]
    assert len(table(out)) == len(df)


def test_all_ok_exit_zero_and_schema(tmp_path):
    make_images(tmp_path / "in", 5)
    out = tmp_path / "out"
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-j", "0", "--weights", "random")
    assert code == 0, output
    t = pq.read_table(out / "toy.parquet")
    assert str(t.schema.field("score").type) == "double"
    assert str(t.schema.field("brightness").type) == "float"
    df = t.to_pandas()
    assert set(df.weights_id) == {"random"} and set(df["head"]) == {"random"}
    assert set(df.rel_path) == {f"img{i:03d}.png" if i % 2 == 0 else f"sub/img{i:03d}.png" for i in range(5)}
    png = Image.open(out / df.heatmap_path.iloc[0])
    assert png.mode == "RGB"


def test_no_maps_writes_rows_and_no_pngs(tmp_path):
    make_images(tmp_path / "in", 3)
    with_maps, without = tmp_path / "maps", tmp_path / "rows"
    assert qscore("image", tmp_path / "in", "-m", "toy", "-o", with_maps, "-j", "0", "--weights", "random")[0] == 0
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", without, "-j", "0", "--weights", "random", "--no-maps")
    assert code == 0, output
    df, full = table(without), table(with_maps)
    assert list(df.score) == list(full.score) and set(df.status) == {"ok"}
    assert df.heatmap_path.isna().all() and full.heatmap_path.notna().all()
    assert not list(without.rglob("*.png"))


def test_same_scores_for_batch_sizes_and_runs(tmp_path):
    make_images(tmp_path / "in", 6)
    scores = []
    for i, bs in enumerate((1, 4, 4)):
        out = tmp_path / f"out{i}"
        assert qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-j", "0", "-b", bs)[0] == 0
        scores.append(table(out).set_index("rel_path").score.sort_index())
    pd.testing.assert_series_equal(scores[0], scores[1], rtol=1e-6)
    pd.testing.assert_series_equal(scores[1], scores[2], rtol=0, atol=0)


def test_parallel_writers_give_the_same_sorted_table_every_run(tmp_path, monkeypatch):
    monkeypatch.setattr("qscore.runner.WRITERS", 4)
    monkeypatch.setattr("qscore.runner.MAX_QUEUED", 5)
    make_images(tmp_path / "in", 12)
    tables = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-j", "0", "-b", 1)[0] == 0
        tables.append(table(out).drop(columns=["path", "decode_ms", "model_ms", "scored_at"], errors="ignore"))
        assert len(list((out / "heatmaps").rglob("*.png"))) == 12
    assert list(tables[0].rel_path) == sorted(tables[0].rel_path)
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_heatmap_colours_and_blend():
    from qscore.artefacts import _RAMP, colourise, overlay

    ramp = colourise(np.linspace(0, 1, len(_RAMP)))  # the anchors land on table entries 0, 64, ...
    assert np.abs(ramp.astype(int) - _RAMP.astype(int)).max() <= 2
    assert (colourise(np.array([-1.0, 2.0, np.nan])) == _RAMP[[0, -1, 0]].astype(np.uint8)).all()
    grey = np.full((4, 6, 3), 100, np.uint8)
    blend = overlay(grey, np.ones((2, 3)), alpha=0.5)  # a flat map normalises to 0: the first colour
    assert blend.shape == (4, 6, 3) and (np.abs(blend.astype(int) - (100 + _RAMP[0]) / 2) <= 0.5).all()


def test_small_runs_spread_files_over_every_worker():
    assert chunk_size(64, 16, 16) == 4  # not 4 batches of 16 on 4 of the 16 workers
    assert chunk_size(1000, 16, 16) == 16  # large runs: whole batches
    assert chunk_size(3, 8, 0) == 3 and chunk_size(0, 8, 4) == 1


def test_oom_halves_batch_and_keeps_every_file(tmp_path):
    make_images(tmp_path / "in", 9)
    out = tmp_path / "out"
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-j", "0", "-b", "8", "--set", "oom_above=2")
    assert code == 0, output
    summary = json.loads((out / "toy.summary.json").read_text())
    assert summary["batch_size"] == 2 and summary["ok"] == 9


def test_a_file_that_breaks_its_batch_is_isolated(tmp_path):
    make_images(tmp_path / "in", 6)
    out = tmp_path / "out"
    code, _ = qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-j", "0", "-b", "6", "--set", "fail_name=img003")
    assert code == 1
    df = table(out).set_index("rel_path")
    assert df.loc["sub/img003.png", "status"] == "error"
    assert "poisoned file" in df.loc["sub/img003.png", "error"]
    assert (df.drop(index="sub/img003.png").status == "ok").all()


def test_usage_errors_exit_2_with_one_line(tmp_path):
    make_images(tmp_path / "in", 1)
    code, output = qscore("image", tmp_path / "in", "-m", "nosuchmodel", "-o", tmp_path / "o")
    assert code == 2 and "unknown model 'nosuchmodel'" in output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", blocker / "out")
    assert code == 2 and "cannot write to --out" in output
    code, output = qscore("image", tmp_path / "nothere", "-m", "toy", "-o", tmp_path / "o")
    assert code == 2 and "no such file or folder" in output
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "--set", "nope=1", "-o", tmp_path / "o")
    assert code == 2 and "unknown option" in output
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "--set", "nope", "-o", tmp_path / "o")
    assert code == 2 and "--set expects KEY=VALUE" in output
    code, output = qscore("bench", "toy", tmp_path / "in", "--set", "nope")
    assert code == 2 and "--set expects KEY=VALUE" in output
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "--bogus-flag")
    assert code == 2


def test_live_lock_refuses_and_stale_lock_is_taken_over(tmp_path):
    make_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "toy.lock").write_text(f"{sleeper.pid}\n")
        code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-j", "0")
        assert code == 2 and "held by running qscore process" in output
    finally:
        sleeper.kill()
        sleeper.wait()
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-j", "0")
    assert code == 0, output
    assert not (out / "toy.lock").exists()
    # a lock holding our own pid was left by a run killed in another container (same pid there)
    (out / "toy.lock").write_text(f"{os.getpid()}\n")
    code, output = qscore("image", tmp_path / "in", "-m", "toy", "-o", out, "-j", "0", "--force")
    assert code == 0, output


def test_kill_minus_9_then_rerun_scores_every_file_once(tmp_path):
    make_images(tmp_path / "in", 24)
    out = tmp_path / "out"
    env = {**os.environ, "QSCORE_EXTRA_MODELS": TOY, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "qscore", "image", str(tmp_path / "in"), "-m", "toy", "-o", str(out),
           "-j", "0", "-b", "2", "--set", "delay=0.4", "-q"]
    proc = kill_mid_run(cmd, env, out, wait_s=60)
    parts = out / ".parts" / "toy"
    assert (out / "toy.lock").read_text().split()[0] == str(proc.pid)  # left behind by the killed run
    rerun = subprocess.run(cmd, env=env, cwd=ROOT)
    assert rerun.returncode == 0  # it took the stale lock over
    assert not (out / "toy.lock").exists()
    df = table(out)
    assert len(df) == 24 and df.rel_path.is_unique and (df.status == "ok").all()
    summary = json.loads((out / "toy.summary.json").read_text())
    assert summary["skipped"] >= 2 * 3  # the batches written before the kill were kept
    assert not parts.exists()


def test_every_command_has_help_with_examples():
    for args in (["--help"], ["image", "--help"], ["video", "--help"], ["forgery", "--help"], ["models", "--help"],
                 ["weights", "--help"], ["weights", "list", "--help"], ["weights", "pull", "--help"],
                 ["weights", "verify", "--help"], ["weights", "path", "--help"], ["train", "--help"], ["bench", "--help"],
                 ["eval", "--help"], ["synth", "--help"]):
        code, output = qscore(*args)
        assert code == 0, (args, output)
        assert "Usage" in output and ("Example" in output or args[0] == "weights" and len(args) == 2), args


def test_bench_reports_bare_and_runner_throughput(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    make_images(tmp_path / "in", 4)
    code, output = qscore("bench", "toy", tmp_path / "in", "--device", "cpu", "-j", "0", "-b", "2", "--repeats", "1",
                          "--warmup", "1", "--json", tmp_path / "bench.json")
    assert code == 0, output
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["files"] == 4 and result["warmup_files"] == 1  # a folder counts its files
    assert result["runner"]["ok"] == 4 and result["bare"]["files_per_s"] > 0
    assert 0 <= result["runner"]["startup_s"] and 0 <= result["runner"]["drain_s"]
    assert result["runner_vs_bare"] == round(result["runner"]["files_per_s"] / result["bare"]["files_per_s"], 3)
