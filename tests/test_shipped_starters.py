"""The starter checkpoints shipped in the package: declared with their sha256, small, complete
(no tensor of the model left at its random initialisation), and scoring shared media on the CPU
with no flag at all, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from qscore.config import RunConfig, build_model
from qscore.runner import run
from qscore.weights import PACKAGED, Registry, file_sha256, load_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STARTERS = {"rsfiqa": "image", "ugdiml": "forgery", "clifvqa": "video"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A fresh install's view: empty cache, no user registry, no network."""
    monkeypatch.setenv("QSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QSCORE_OFFLINE", "1")
    monkeypatch.delenv("QSCORE_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_starter_is_declared_small_and_matches_its_sha256(offline):
    reg = Registry.load()
    keys = [k for k in reg.keys() if k.endswith("-starter")]
    assert sorted(keys) == sorted(f"{m}-starter" for m in STARTERS)
    total = 0
    for key in keys:
        entry, file = reg.entry(key), reg.path(key)
        assert file.parent == PACKAGED.parent / "starter" and file.is_file()
        assert entry.sha256 == file_sha256(file) and entry.size == file.stat().st_size
        state, card = load_checkpoint(file, expect_model=key.removesuffix("-starter"))  # card matches the file
        assert all(t.dtype in (torch.float16, torch.int64, torch.long, torch.uint8, torch.bool) for t in state.values())
        assert card["starter"]["held_out"] and card["starter"]["data"] and card["licence"]
        total += file.stat().st_size
    assert total <= 60e6


@pytest.mark.parametrize("name", list(STARTERS))
def test_the_default_configuration_is_the_starter_with_every_tensor_trained(offline, name):
    cfg = RunConfig(task=STARTERS[name], model=name, inputs=[], device="cpu")
    model, weights_id, head = build_model(cfg, torch.device("cpu"))
    assert head == "starter" and weights_id.startswith(f"{name}-starter@sha256:")
    state, _ = load_checkpoint(Registry.load().path(f"{name}-starter"))
    assert set(model.state_dict()) <= set(state)  # nothing left random
    if name == "rsfiqa":
        assert model.partition == "slic"  # no SAM weights in a fresh cache


def score(offline, task, inputs, **kw) -> pd.DataFrame:
    out = offline / "out"
    cfg = RunConfig(task=task, model=kw.pop("model"), inputs=[str(p) for p in inputs], out=out, device="cpu",
                    workers=0, progress=False, quiet=True, **kw)
    assert run(cfg) == 0
    return pd.concat([pd.read_parquet(f) for f in out.glob("*.parquet")])


def test_the_image_starter_scores_a_shared_photo(offline):
    photo = offline / "photos"
    photo.mkdir()
    shutil.copy(next(iter(sorted((SHARED / "biq2021" / "images").glob("*.jpg")))), photo)
    rows = score(offline, "image", [photo], model="rsfiqa")
    assert list(rows.status) == ["ok"] and list(rows["head"]) == ["starter"] and list(rows.regions) == ["slic"]
    assert 0 <= rows.score.iloc[0] <= 1 and (offline / "out" / rows.heatmap_path.iloc[0]).is_file()


def test_the_video_starter_scores_a_shared_clip(offline):
    clips = offline / "clips"
    clips.mkdir()
    for name in ("carphone_pristine.mp4", "carphone_distorted.mp4"):
        shutil.copy(SHARED / "video" / name, clips)
    rows = score(offline, "video", [clips], model="clifvqa").set_index("rel_path")
    assert list(rows.status) == ["ok", "ok"] and set(rows["head"]) == {"starter"}
    assert rows.score["carphone_pristine.mp4"] > rows.score["carphone_distorted.mp4"]  # the same scene, degraded
    assert rows.heatmap_path.isna().all()  # its windows are rated by a random CLIP: no map is drawn from them


def test_the_forgery_starter_serves_both_modes(offline):
    photo = sorted((SHARED / "pristine" / "bsds500" / "images").glob("*.jpg"))[0]
    (offline / "images").mkdir()
    shutil.copy(photo, offline / "images" / "a.jpg")
    iml = score(offline, "forgery", [offline / "images"], model="ugdiml")
    pairs = offline / "pairs.csv"
    pairs.write_text(f"forged,reference\n{offline / 'images' / 'a.jpg'},{photo}\n")
    ciml = score(offline, "forgery", [], model="ugdiml", pairs=str(pairs), overrides={"mode": "ciml"})
    ciml = ciml[ciml["mode"] == "ciml"]
    for rows in (iml[iml["mode"] == "iml"], ciml):
        assert list(rows.status) == ["ok"] and list(rows["head"]) == ["starter"]
        assert rows.weights_id.iloc[0] == iml.weights_id.iloc[0]  # one checkpoint, both modes
    card = json.loads((PACKAGED.parent / "starter" / "ugdiml.json").read_text())
    assert {"iml_jpeg_test", "ciml_jpeg_test"} <= set(card["starter"]["held_out"])
