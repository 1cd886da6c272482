"""Region partitions without SAM (SLIC), regions=auto, and how the runner picks a starter."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qscore.models.rsfiqa import RSFIQA
from qscore.models.sam_regions import RegionRules, slic_label_map
from qscore.config import RunConfig, build_model
from qscore.runner import precompute
from qscore.types import Item, UsageError
from qscore.weights import Registry, file_sha256, save_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = dict(backbone="test_resnet", crop_size=64, test_grid=2, max_side=128, dim=32, heads=2)


def photo() -> np.ndarray:
    path = sorted((SHARED / "pristine" / "bsds500" / "images").glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


def test_slic_label_map_follows_the_rules_and_is_deterministic():
    image = photo()
    rules = RegionRules(min_region_frac=0.02, r_max=8)
    labels = slic_label_map(image, rules)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int64
    areas = np.bincount(labels.ravel())
    assert 2 <= len(areas) <= rules.r_max and (areas > 0).all()  # labels 0..R-1, each present
    assert (areas >= rules.min_region_frac * labels.size).all()
    assert (np.diff(areas) <= 0).all()  # label 0 is the largest
    assert np.array_equal(labels, slic_label_map(image, rules))


def test_slic_regions_follow_colour():
    image = np.zeros((120, 160, 3), np.uint8)
    image[:, :100] = (200, 30, 30)
    image[:, 100:] = (20, 60, 220)
    labels = slic_label_map(image, RegionRules(min_region_frac=0.01, r_max=2))
    assert len(np.unique(labels[:, :100])) == 1 and len(np.unique(labels[:, 100:])) == 1
    assert labels[0, 0] == 0 and labels[0, -1] == 1  # the larger (red) part is label 0


def test_regions_auto_is_sam_only_where_its_weights_are_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("QSCORE_HOME", str(tmp_path / "home"))
    registry = Registry.load()
    auto = RSFIQA.make_config()
    assert auto.regions == "auto" and RSFIQA.settle(auto, registry).regions == "slic"
    sam_file = registry.cache_path("sam-vit-b")
    sam_file.parent.mkdir(parents=True)
    sam_file.write_bytes(b"placed by hand")
    assert RSFIQA.settle(auto, registry).regions == "sam"
    assert RSFIQA.settle(RSFIQA.make_config("tiny"), registry).regions == "sam"  # the test SAM needs no file
    assert RSFIQA.settle(RSFIQA.make_config(regions="slic"), registry).regions == "slic"
    assert RSFIQA(RSFIQA.make_config("starter")).regions is None  # built without a registry: SLIC


def test_rsfiqa_on_slic_regions_scores_and_caches(tmp_path):
    Image.fromarray(photo()).save(tmp_path / "a.png")
    st = os.stat(tmp_path / "a.png")
    item = Item(str(tmp_path / "a.png"), "a.png", st.st_size, st.st_mtime)
    torch.manual_seed(0)
    model = RSFIQA(RSFIQA.make_config("tiny", regions="slic", describer="measured", cache_dir=str(tmp_path / "c"), **SMALL)).eval()
    scores = []
    for _ in range(2):  # cold, then warm cache
        samples = [model.preparer()(item)]
        assert ("partition" in samples[0].inputs) == (not scores)
        batch = model.collate(samples)
        with torch.no_grad():
            precompute(model, batch, model.cache())  # the runner's region stage keeps them
            outputs = model(batch)
        columns = model.postprocess(outputs, samples)[0].columns
        assert columns["regions"] == "slic" and columns["n_regions"] > 1
        scores.append(columns["score"])
    assert scores[0] == scores[1]


@pytest.fixture
def starter(tmp_path, monkeypatch):
    """A user registry declaring an ``rsfiqa-starter`` (a tiny random checkpoint made here) and an
    empty ``rsfiqa-head`` slot, as the packaged weights.toml does."""
    monkeypatch.setenv("QSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QSCORE_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    config = RSFIQA.make_config("tiny", regions="slic", describer="measured", **SMALL)
    torch.manual_seed(1)
    model = RSFIQA(config)
    card = {"model": "rsfiqa", "preset": "tiny", "config": {**dataclasses.asdict(config), "cache_dir": ""}, "backbone": "random"}
    save_checkpoint(tmp_path / "starter" / "rsfiqa.safetensors", model.state_dict(), card)
    file = tmp_path / "starter" / "rsfiqa.safetensors"
    text = (f'[rsfiqa-starter]\npath = "starter/rsfiqa.safetensors"\nsha256 = "{file_sha256(file)}"\n'
            'licence = "test"\nused_by = ["rsfiqa"]\n'
            '[rsfiqa-head]\nsource = "none"\nlicence = "none"\nused_by = ["rsfiqa"]\n')
    (tmp_path / "reg.toml").write_text(text)
    Image.fromarray(photo()).save(tmp_path / "a.png")
    return tmp_path / "reg.toml", file


def config(registry, **kw) -> RunConfig:
    return RunConfig(task="image", model="rsfiqa", inputs=[], registry=str(registry), device="cpu", **kw)


def test_the_starter_loads_with_no_flag_and_says_so(starter):
    registry, file = starter
    model, weights_id, head = build_model(config(registry), torch.device("cpu"))
    card = json.loads(file.with_suffix(".json").read_text())
    assert head == "starter" and weights_id == f"rsfiqa-starter@{card['weights_id']}"
    assert model.config.regions == "slic" and model.config.backbone == "test_resnet"  # its card's config
    model2, weights_id2, head2 = build_model(config(registry, weights="random", preset="tiny"), torch.device("cpu"))
    assert head2 == "random"  # --weights wins over the starter


def test_a_trained_head_or_another_preset_wins_over_the_starter(starter, tmp_path):
    registry, file = starter
    with pytest.raises(UsageError, match="clip"):  # default preset: no starter for it, CLIP missing
        build_model(config(registry, preset="default"), torch.device("cpu"))
    text = registry.read_text().replace(
        '[rsfiqa-head]\nsource = "none"', f'[rsfiqa-head]\npath = "{file}"')
    registry.write_text(text)
    _, weights_id, head = build_model(config(registry), torch.device("cpu"))
    assert head == "trained" and not weights_id.startswith("rsfiqa-starter")


def test_a_starter_that_does_not_match_its_sha256_is_refused(starter):
    registry, file = starter
    registry.write_text(registry.read_text().replace(file_sha256(file), "0" * 64))
    with pytest.raises(UsageError, match="sha256"):
        build_model(config(registry), torch.device("cpu"))
