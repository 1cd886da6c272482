"""Synthetic data generators: deterministic, valid labels, exact masks, monotone severity."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qscore.train import synth
from qscore.train.labels import read_labels

PRISTINE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pristine"
pytestmark = pytest.mark.skipif(not (PRISTINE / "bsds500").is_dir(), reason="needs ../shared/data/pristine")
SMALL = dict(size=(64, 48), frames=8, fps=8)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_video_is_deterministic_and_labels_are_valid(tmp_path):
    a = synth.generate_video(tmp_path / "a", 4, seed=5, pristine=PRISTINE, workers=0, **SMALL)
    synth.generate_video(tmp_path / "b", 4, seed=5, pristine=PRISTINE, workers=0, **SMALL)
    synth.generate_video(tmp_path / "c", 4, seed=6, pristine=PRISTINE, workers=0, **SMALL)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    table = rows(a)
    assert len(table) == 4
    for row in table:
        assert 0.0 <= float(row["mos"]) <= 1.0
        levels = dict(kv.split(":") for kv in row["distortions"].split(";") if kv)
        assert float(row["mos"]) == pytest.approx(synth.video_mos({k: int(v) for k, v in levels.items()}), abs=1e-6)
        frames = decode(tmp_path / "a" / row["path"])
        assert frames.shape == (8, 48, 64, 3)
    splits = {name: rows(tmp_path / "a" / f"{name}.csv") for name in ("train", "val", "test")}
    assert sorted(r["path"] for s in splits.values() for r in s) == sorted(r["path"] for r in table)
    assert all(list(r) == ["path", "mos"] for s in splits.values() for r in s)
    labels = read_labels(tmp_path / "a" / "train.csv", "video")  # what `qscore train` reads
    assert len(labels) == len(splits["train"])


def test_splits_are_by_source_photo():
    order, split = synth.source_order(500, 40, seed=0)
    assert len(order) == 40 and split.count("val") == split.count("test") == 6
    assigned = {}
    for i in range(1200):  # more samples than photos: photos repeat, always in the same split
        j, s = synth.sample_source(i, order, split)
        assert assigned.setdefault(j, s) == s


def test_severity_is_monotone_in_level():
    for kind in synth.VIDEO_PARAMS:
        alone = [synth.video_mos({kind: level}) for level in range(1, 6)]
        other = "blur" if kind != "blur" else "noise"
        mixed = [synth.video_mos({kind: level, other: 2}) for level in range(1, 6)]
        assert all(x > y for x, y in zip(alone, alone[1:])), kind
        assert all(x > y for x, y in zip(mixed, mixed[1:])), kind
        assert alone[0] < synth.video_mos({}) == 1.0


def test_distortion_strength_grows_with_level(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.open(sorted((PRISTINE / "kodak").glob("*.png"))[0]).convert("RGB")
    clean = synth.camera_move(photo, (64, 48), 8, rng)
    for kind in ("blur", "noise", "exposure", "flicker"):
        err = [np.mean((synth.distort(clean, {kind: lv}, np.random.default_rng(1)).astype(float) - clean) ** 2)
               for lv in range(1, 6)]
        assert all(x < y for x, y in zip(err, err[1:])), (kind, err)
    distinct = [len(np.unique(synth.distort(clean, {"stutter": lv}, rng).reshape(8, -1), axis=0)) for lv in range(1, 6)]
    assert all(x >= y for x, y in zip(distinct, distinct[1:])) and distinct[0] < 8
    err = []
    for crf in (synth.CLEAN_CRF, *synth.VIDEO_PARAMS["compression"]):
        synth.encode_mp4(tmp_path / "c.mp4", clean, 8, crf)
        err.append(np.mean((decode(tmp_path / "c.mp4").astype(float) - clean) ** 2))
    assert all(x < y for x, y in zip(err, err[1:])), err


def test_forgery_mask_is_exactly_the_changed_pixels():
    photos = synth.segmented_photos(PRISTINE)
    kinds = set()
    for i in range(8):
        (p, s), (d, ds) = photos[i], photos[i + 20]
        task = synth.ForgeryTask(i, 0, str(p), str(s), str(d), str(ds), "train", "", authentic_fraction=0.2)
        sample = synth.make_forgery_sample(task, np.random.default_rng(i))
        kinds.add(sample.kind)
        assert sample.forged.shape == sample.reference.shape and sample.mask.shape == sample.reference.shape[:2]
        np.testing.assert_array_equal(sample.mask, np.any(sample.forged != sample.reference, axis=-1))
        assert sample.mask.any() == (sample.kind != "authentic")
    assert kinds == {"splice", "copymove", "inpaint", "authentic"}


def test_inpainting_removes_a_segment_with_an_exact_mask():
    photos = synth.segmented_photos(PRISTINE)
    seen = 0
    for i in range(40):  # the samples of this task's generator that are inpaintings
        (p, s), (d, ds) = photos[i], photos[i + 100]
        task = synth.ForgeryTask(i, 0, str(p), str(s), str(d), str(ds), "train", "", authentic_fraction=0.0)
        rng = np.random.default_rng([7, i])
        sample = synth.make_forgery_sample(task, rng)
        if sample.kind != "inpaint":
            continue
        seen += 1
        np.testing.assert_array_equal(sample.mask, np.any(sample.forged != sample.reference, axis=-1))
        assert sample.mask.any()
        # the change is one BSDS segment (grown by the 2 px outline), nearly all of it repainted
        rng = np.random.default_rng([7, i])
        rng.random()  # the kind draw
        region = synth.pick_object(synth._labels(str(s)), rng)
        grown = synth.binary_dilation(region, iterations=2)
        assert not (sample.mask & ~grown).any()
        assert sample.mask[region].mean() > 0.9
        np.testing.assert_array_equal(sample.forged[~grown], sample.reference[~grown])
        # a fill from the surroundings, with grain: not the object, not a flat smear
        ref, fake = sample.reference.astype(float), sample.forged.astype(float)
        assert np.abs(fake - ref)[region].mean() > 2
        highpass = lambda x: x - synth.gaussian_filter(x, sigma=(1.5, 1.5, 0))  # noqa: E731
        inner = synth.binary_dilation(~grown, iterations=3, border_value=1) ^ True  # away from the hole's edge
        if inner.sum() > 200:
            assert np.abs(highpass(fake)[inner]).mean() > 0.5
    assert seen >= 8


def test_inpainting_is_fast_enough():
    import time

    photos = synth.segmented_photos(PRISTINE)
    times = []
    for i in range(0, 200, 20):
        image, segments = synth._rgb(str(photos[i][0])), synth._labels(str(photos[i][1]))
        rng = np.random.default_rng(i)
        region = synth.pick_region(segments, rng, 0.1, 0.25)  # big holes: solved at a reduced resolution
        start = time.perf_counter()
        out = synth.inpaint(image, region, rng)
        times.append(time.perf_counter() - start)
        assert np.any(out != image, axis=-1)[region].mean() > 0.9
    assert np.median(times) < 0.6, times  # ~0.1 s on an idle core; generous for busy machines


def test_jpeg_option_recompresses_every_image(tmp_path):
    from qscore.cli import app

    result = CliRunner().invoke(app, ["synth", "forgery", "--out", str(tmp_path / "j"), "--n", "8", "--seed", "3",
                                      "--jpeg", "1", "--authentic", "0.25", "--pristine", str(PRISTINE), "--workers", "0",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    table = rows(tmp_path / "j" / "labels.csv")
    assert {r["kind"] for r in table} >= {"authentic"} and len(table) == 8
    for r in table:
        assert r["forged"].endswith(".jpg") and "jpeg:" in r["post"], r
        with Image.open(tmp_path / "j" / r["forged"]) as im:
            assert im.format == "JPEG"
    never = rows(synth.generate_forgery(tmp_path / "p", 8, seed=3, pristine=PRISTINE, authentic_fraction=0.25,
                                        workers=0, jpeg=0.0))
    assert all(r["forged"].endswith(".png") and "jpeg" not in r["post"] for r in never)
    for a, b in zip(table, never):  # the same seed: the same sources, splits and edits, only the JPEG differs
        assert [a[k] for k in ("kind", "source", "donor", "split", "mask")] == [b[k] for k in ("kind", "source", "donor", "split", "mask")]
        if a["mask"]:
            assert (tmp_path / "j" / a["mask"]).read_bytes() == (tmp_path / "p" / b["mask"]).read_bytes()
    with pytest.raises(synth.SynthError, match="--jpeg"):
        synth.generate_forgery(tmp_path / "x", 1, pristine=PRISTINE, workers=0, jpeg=1.5)


def test_video_clips_are_held_out_by_split_and_deterministic(tmp_path):
    clips = PRISTINE.parent / "video"
    if not clips.is_dir():
        pytest.skip("needs ../shared/data/video")
    kw = dict(seed=1, pristine=PRISTINE, clips=clips, clip_fraction=0.5, **SMALL)
    labels = synth.generate_video(tmp_path / "a", 12, workers=0, **kw)
    synth.generate_video(tmp_path / "b", 12, workers=2, **kw)  # same bytes in a pool
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    table = rows(labels)
    from_clips = [r for r in table if r["source"].endswith(".mp4")]
    assert len(from_clips) == 6 and all(r["start"] != "" for r in from_clips)
    assert all(r["start"] == "" for r in table if r not in from_clips)
    assert {r["source"] for r in from_clips} == {"bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"}  # no *distorted*
    split_of = {}
    for r in table:  # no source clip (or photo) in two splits
        assert split_of.setdefault(r["source"], r["split"]) == r["split"], r
    assert sorted(split_of[c] for c in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")) == ["test", "train", "val"]
    for r in from_clips:
        assert decode(tmp_path / "a" / r["path"]).shape == (8, 48, 64, 3)
        assert float(r["mos"]) == pytest.approx(synth.video_mos({k: int(v) for k, v in (kv.split(":") for kv in r["distortions"].split(";") if kv)}), abs=1e-6)
    none = rows(synth.generate_video(tmp_path / "c", 4, workers=0, **{**kw, "clips": "none"}))
    assert not any(r["source"].endswith(".mp4") for r in none)
    with pytest.raises(synth.SynthError, match="--clips"):
        synth.generate_video(tmp_path / "d", 2, workers=0, **{**kw, "clips": tmp_path / "missing"})


def test_clips_smaller_than_the_output_are_left_out_not_upscaled(tmp_path):
    clips = PRISTINE.parent / "video"
    if not clips.is_dir():
        pytest.skip("needs ../shared/data/video")
    videos = synth.source_clips(clips)
    kept, skipped = synth.clips_covering(videos, (192, 160))  # carphone is 176x144
    assert [p.name for p in kept] == ["bigbuckbunny.mp4", "bikes.mp4"]
    assert list(skipped) == ["carphone_pristine.mp4"] and "176x144" in skipped["carphone_pristine.mp4"]
    assert synth.clips_covering(videos, (64, 48)) == (videos, {})
    only = tmp_path / "only"
    only.mkdir()
    (only / "carphone_pristine.mp4").symlink_to(clips / "carphone_pristine.mp4")
    with pytest.raises(synth.SynthError, match="no clip covers --size 192x160"):
        synth.generate_video(tmp_path / "x", 2, pristine=PRISTINE, workers=0, size=(192, 160), frames=2, clips=only)


def test_few_sources_give_each_split_its_share_of_the_samples():
    """Three clips, one per split: 70 / 15 / 15 % of the clip samples, not a third each."""
    order, split = synth.source_order(3, 600, seed=7, stream=1)
    picked = synth.sources_by_share(order, split, 600)
    counts = {s: sum(1 for _, name in picked if name == s) for s in ("train", "val", "test")}
    assert counts == {"train": 420, "val": 90, "test": 90}
    assert all(split[list(order).index(j)] == name for j, name in picked)  # each clip stays in its split
    order, split = synth.source_order(7, 100, seed=0)
    picked = synth.sources_by_share(order, split, 100)
    assert {j for j, name in picked if name == "train"} == {int(o) for o, s in zip(order, split) if s == "train"}


def test_clip_window_follows_the_clip_and_plays_back_when_short():
    path = str(PRISTINE.parent / "video" / "carphone_pristine.mp4")
    if not Path(path).is_file():
        pytest.skip("needs ../shared/data/video")
    source = synth.decoded_clip(path, (64, 48))
    n = len(source)
    frames, start = synth.clip_window(path, (64, 48), 10, np.random.default_rng(0))
    assert frames.shape == (10, 48, 64, 3) and 0 <= start <= n - 10
    diffs = [np.abs(frames[t + 1].astype(float) - frames[t]).mean() for t in range(9)]
    assert 0 < max(diffs)  # real motion, not a still
    long, start = synth.clip_window(path, (64, 48), n + 10, np.random.default_rng(0))
    assert start == 0 and len(long) == n + 10
    np.testing.assert_array_equal(long[n], long[n - 2])  # back and forth past the last frame
    np.testing.assert_array_equal(long[n + 9], long[n - 11])


def test_forgery_files_labels_and_determinism(tmp_path):
    labels = synth.generate_forgery(tmp_path / "a", 10, seed=2, pristine=PRISTINE, workers=0)
    synth.generate_forgery(tmp_path / "b", 10, seed=2, pristine=PRISTINE, workers=2)  # same bytes in a pool
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    table = rows(labels)
    split_of = {r["source"]: r["split"] for r in table}
    for r in table:
        forged = np.asarray(Image.open(tmp_path / "a" / r["forged"]).convert("RGB"))
        reference = np.asarray(Image.open(tmp_path / "a" / r["reference"]).convert("RGB"))
        if r["donor"]:
            assert split_of[r["donor"]] == r["split"]  # splice donors never cross splits
        if r["kind"] == "authentic":
            assert r["mask"] == "" and (r["post"] or np.array_equal(forged, reference))
            continue
        mask = np.asarray(Image.open(tmp_path / "a" / r["mask"])) > 127
        assert mask.shape == forged.shape[:2] and mask.any()
        assert float(r["manipulated_fraction"]) == pytest.approx(mask.mean(), abs=1e-6)
        if not r["post"]:  # saved losslessly: the mask is exactly where the pixels differ
            np.testing.assert_array_equal(mask, np.any(forged != reference, axis=-1))
    parsed = read_labels(tmp_path / "a" / "train.csv", "forgery")
    assert all(it.reference for it in parsed.items)
    assert set(parsed.targets) <= {0.0, 1.0}


def test_synth_cli(tmp_path):
    from qscore.cli import app

    cli = CliRunner()
    result = cli.invoke(app, ["synth", "video", "--out", str(tmp_path / "v"), "--n", "2", "--size", "64x48",
                              "--frames", "4", "--pristine", str(PRISTINE), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(rows(tmp_path / "v" / "labels.csv")) == 2
    for args, message in ((["bogus"], "'video' or 'forgery'"), (["video", "--size", "63x48"], "--size"),
                          (["forgery", "--jpeg", "2"], "--jpeg"), (["video", "--clips", str(tmp_path / "none-here")], "--clips"),
                          (["forgery", "--pristine", str(tmp_path)], "no BSDS500"), (["video", "--size", "big"], "WxH")):
        result = cli.invoke(app, ["synth", *args, "--out", str(tmp_path / "x"), "--n", "1", "--workers", "0"])
        assert result.exit_code == 2 and message in result.output and result.output.count("qscore:") == 1, result.output
