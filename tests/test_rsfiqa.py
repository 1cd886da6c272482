"""RSFIQA on the CPU: RSA invariants, crops, heatmap size, region cache, backbone swap, training."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from qscore.models.rsfiqa import RSA, RSFIQA, Backbone, parse_answer
from qscore.types import Item, MissingWeights

SMALL = dict(backbone="test_resnet", crop_size=64, test_grid=2, max_side=128, dim=32, heads=2)


def write_image(path, h, w, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 40, 30)
    img[: h // 2, w // 2 :] = (30, 180, 60)
    img[h // 2 :, w // 2 :] = rng.integers(0, 255, (h - h // 2, w - w // 2, 3))
    Image.fromarray(img).save(path)
    st = os.stat(path)
    return Item(str(path), path.name, st.st_size, st.st_mtime)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    cache = tmp_path_factory.mktemp("cache")
    return RSFIQA(RSFIQA.make_config("tiny", cache_dir=str(cache), **SMALL)).eval()


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [write_image(folder / "a.png", 150, 200, 0), write_image(folder / "b.png", 96, 80, 1)]


def run(model, items, train=False):
    """As the runner runs a batch: its region stage (kept in the cache), then the forward."""
    from qscore.runner import precompute

    prepare = model.preparer(train=train)
    samples = [prepare(item) for item in items]
    batch = model.collate(samples)
    with torch.no_grad():
        precompute(model, batch, model.cache())
        outputs = model(batch)
    return samples, outputs


def random_regions(seed, b=2, r=5, h=6, w=6, c=24, e=12):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, r - 1, (b, h * 4, w * 4), generator=g)  # region r-1 never appears
    area = torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.one_hot(labels, r).permute(0, 3, 1, 2).float(), (h, w))
    return torch.randn(b, c, h, w, generator=g), area, torch.randn(b, r, e, generator=g)


def test_rsa_attention_sums_to_one_and_absent_regions_weigh_zero():
    torch.manual_seed(0)
    rsa = RSA(24, 12, dim=32, layers=2, heads=4).eval()
    feats, area, regions = random_regions(0)
    present = area.flatten(2).sum(-1) > 0
    score, g, w = rsa(feats, area, regions, present)
    assert score.shape == (2,) and g.shape == (2, 6, 6)
    torch.testing.assert_close(g.flatten(1).sum(-1), torch.ones(2))
    assert bool((g >= 0).all())
    assert not present[:, -1].any() and bool((w[:, -1] == 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


def test_rsa_region_order_does_not_change_the_score():
    torch.manual_seed(1)
    rsa = RSA(24, 12, dim=32, layers=2, heads=4).eval()
    feats, area, regions = random_regions(1)
    present = area.flatten(2).sum(-1) > 0
    perm = torch.tensor([3, 0, 4, 1, 2])
    s1, g1, w1 = rsa(feats, area, regions, present)
    s2, g2, w2 = rsa(feats, area[:, perm], regions[:, perm], present[:, perm])
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w1[:, perm], w2, atol=1e-6, rtol=1e-5)


def test_end_to_end_heatmap_columns_and_cache_hit(model, items):
    samples, first = run(model, items)
    assert not any("labels" in s.inputs for s in samples)  # cold cache: SAM + describer ran
    outputs = model.postprocess({k: v.float() for k, v in first.items()}, samples)
    for item, sample, out in zip(items, samples, outputs):
        h, w = np.asarray(Image.open(item.path)).shape[:2]
        assert out.artefacts["heatmap"].shape == (h, w, 3) and out.artefacts["heatmap"].dtype == np.uint8
        cols = out.columns
        assert set(cols) == {"score", *RSFIQA.spec.columns}
        assert 0 <= cols["score"] <= 1 and 1 <= cols["n_regions"] <= model.config.r_max
        assert 0 < cols["top_region_weight"] <= 1 and all(0 <= cols[f"rating_{d}"] <= 1 for d in ("noise", "blur"))
        # the heatmap covers the working image and integrates to one per crop on average
        heat = out.arrays["heatmap"]
        assert heat.shape == sample.inputs["image"].shape[1:] and heat.min() >= 0 and heat.max() > 0
    assert sample.inputs["image"].shape[1:] == (96, 80) and samples[0].inputs["image"].shape[1:] == (96, 128)
    samples, second = run(model, items)
    assert all("labels" in s.inputs for s in samples)  # warm cache: nothing recomputed
    torch.testing.assert_close(second["score"], first["score"])
    assert torch.equal(second["n_regions"], first["n_regions"])


def test_score_does_not_depend_on_batch(model, items):
    _, both = run(model, items)
    alone = torch.cat([run(model, [item])[1]["score"] for item in items])
    torch.testing.assert_close(both["score"], alone, atol=1e-6, rtol=1e-5)


def test_label_map_is_cropped_with_the_image(model):
    labels = torch.randint(0, 4, (1, 100, 90), dtype=torch.uint8)
    batch = {
        "image": (labels * 50)[:, None].expand(1, 3, 100, 90).clone(),
        "labels": labels,
        "origins": torch.tensor([[[0, 0], [36, 26], [10, 5]]]),
        "flip": torch.tensor([[False, True, False]]),
    }
    images, crops = model.crops(batch)
    assert images.shape == (3, 3, 64, 64) and crops.shape == (3, 64, 64)
    assert torch.equal(images[:, 0].long(), crops * 50)
    assert torch.equal(crops[1], labels[0, 36:100, 26:90].flip(-1).long())


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "tv:mobilenet_v3_small"])
def test_backbone_swap_gives_a_feature_map(name):
    backbone = Backbone(name, 64).eval()
    out = backbone(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.dim() == 4 and out.shape[:2] == (2, backbone.channels) and out.shape[-1] >= 1


def test_vit_backbone_runs_the_whole_model(tmp_path, items):
    torch.manual_seed(0)
    config = RSFIQA.make_config("tiny", cache_dir=str(tmp_path), **{**SMALL, "backbone": "test_vit"})
    model = RSFIQA(config).eval()
    _, outputs = run(model, items[1:])
    assert outputs["score"].shape == (1,) and torch.isfinite(outputs["score"]).all()


def test_training_step_updates_backbone_and_rsa_only(model, items):
    model.train()
    try:
        prepare = model.preparer(train=True)
        batch = model.collate([prepare(item) for item in items])
        assert batch["origins"].shape == (2, 1, 2)
        loss = model.training_loss(batch, torch.tensor([0.3, 0.8]))
        loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(loss)
    params = [p for group in model.trainable_parameters() for p in group["params"]]
    trainable = {id(p) for p in params}
    assert trainable and all(p.grad is not None for p in params if p.dim() > 1)
    assert all(id(p) not in trainable for p in model.regions.parameters())
    assert all(id(p) not in trainable for p in model.describer.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_run_then_cache_hit(tmp_path, items):
    """As the runner runs it: CUDA, bf16 autocast, inference mode; the second run reads the cache."""
    from qscore.runner import precompute

    torch.manual_seed(0)
    model = RSFIQA(RSFIQA.make_config("tiny", cache_dir=str(tmp_path), **SMALL)).cuda().eval()
    scores = []
    for _ in range(2):
        prepare = model.preparer()
        batch = {k: v.cuda() for k, v in model.collate([prepare(item) for item in items]).items()}
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            precompute(model, batch, model.cache())
            scores.append(model(batch)["score"].float().cpu())
    assert bool(batch["cached"].all()) and torch.isfinite(scores[0]).all()
    torch.testing.assert_close(scores[0], scores[1])


def test_mllm_answer_parsing():
    ratings, content = parse_answer('Sure: {"content": "dog", "colour": 0, "noise": 4, "artifact": 2, "blur": 1, '
                                    '"exposure": 0, "overall": 3}')
    assert ratings == [1.0, 0.0, 0.5, 0.75, 1.0, 0.75]
    ratings, content_unknown = parse_answer("no json here")
    assert ratings == [0.5] * 6 and content != content_unknown


def test_measured_describer_rates_each_region_by_its_own_pixels():
    """Left half clean, right half degraded: only the right region's rating of that distortion falls."""
    from qscore.models.rsfiqa import DIMENSIONS, MeasuredDescriber

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:256]
    blocks = rng.integers(60, 200, (128 // 6 + 1, 256 // 6 + 1)).repeat(6, 0).repeat(6, 1)[:128, :256]
    base = (blocks + 20 * np.sin(xx / 5.0) * np.cos(yy / 7.0))[..., None].repeat(3, -1)  # sharp edges
    flat = np.full((128, 256, 3), 120.0)
    labels = torch.zeros(128, 256, dtype=torch.long)
    labels[:, 128:] = 1
    describe = MeasuredDescriber()

    def ratings(img):
        image = torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)).permute(2, 0, 1)
        e, content = describe(image, labels, 2)
        assert e.shape == (2, describe.dim) and (content == -1).all()
        return dict(zip(DIMENSIONS, e[:, -len(DIMENSIONS) :].T))

    noisy = flat.copy()
    noisy[:, 128:] += rng.normal(0, 12, (128, 128, 3))
    r = ratings(noisy)
    assert r["noise"][1] < 0.2 < 0.9 < r["noise"][0]

    blurred = base.copy()
    blurred[:, 128:] = np.asarray(Image.fromarray(base[:, 128:].astype(np.uint8)).resize((16, 16)).resize((128, 128), Image.BICUBIC))
    r = ratings(blurred)
    assert r["blur"][1] < r["blur"][0] - 0.3

    dark = base.copy()
    dark[:, 128:] *= 0.15
    r = ratings(dark)
    assert r["exposure"][1] < r["exposure"][0] - 0.3
    grey = base * (1.5, 0.9, 0.3) * rng.uniform(0.6, 1.2, (128 // 6 + 1, 256 // 6 + 1, 3)).repeat(6, 0).repeat(6, 1)[:128, :256]
    grey[:, 128:] = grey[:, 128:].mean(-1, keepdims=True)
    r = ratings(grey)
    assert r["colour"][1] < 0.05 < 0.5 < r["colour"][0]
    assert all(((v >= 0) & (v <= 1)).all() for v in r.values())


def test_measured_describer_sees_jpeg_blocks():
    from qscore.models.rsfiqa import DIMENSIONS, MeasuredDescriber
    import io

    yy, xx = np.mgrid[0:128, 0:128]
    img = np.stack([128 + 50 * np.sin(xx / 9.0 + yy / 13.0)] * 3, -1).astype(np.uint8)
    labels = torch.zeros(128, 128, dtype=torch.long)

    def artifact(quality):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        decoded = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1)
        return float(MeasuredDescriber()(decoded, labels, 1)[0][0, len(DIMENSIONS) * -1 + DIMENSIONS.index("artifact")])

    assert artifact(5) < artifact(95) - 0.2


def test_measured_describer_model_scores_without_clip(tmp_path, items):
    model = RSFIQA(RSFIQA.make_config("tiny", cache_dir=str(tmp_path), describer="measured", **SMALL)).eval()
    assert not hasattr(model.describer, "clip")
    samples, outputs = run(model, items)
    rows = model.postprocess(outputs, samples)
    assert rows[0].columns["largest_region"] is None
    assert 0 <= rows[0].columns["rating_noise"] <= 1 and torch.isfinite(outputs["score"]).all()
    with pytest.raises(MissingWeights, match=r"for sam=tiny; use --weights random"):  # CLIP is not asked for
        model.load_backbone(None)
    model.maps = False  # --no-maps: the same columns, no heatmap built
    bare = model.postprocess(outputs, samples)
    assert [r.columns for r in bare] == [r.columns for r in rows] and not bare[0].artefacts and not bare[0].arrays


def test_heatmap_blends_overlapping_crops_without_seams(model):
    """Two overlapping crops with different flat attention: the map keeps each crop's value
    where only it covers, and moves between them without a step at the inner crop edge."""
    from types import SimpleNamespace

    c = model.config.crop_size
    origins = torch.tensor([[0, 0], [0, c // 2]])
    sample = SimpleNamespace(inputs={"image": torch.zeros(3, c, c + c // 2), "origins": origins, "flip": torch.zeros(2, dtype=torch.bool)})
    g = torch.ones(2, 4, 4) / 16
    g[1] *= 3  # the second crop's density is 3x the first's (a different crop normalisation)
    heat = model.heatmap(g, sample)
    row = heat[c // 2] / heat[c // 2, 0]
    assert np.allclose(row[: c // 2 - 1], 1.0, atol=1e-4) and np.allclose(row[c + 1 :], 3.0, atol=1e-4)
    assert np.abs(np.diff(row)).max() < 0.2  # a hard average would jump by 1.0 at x = c // 2 and c
