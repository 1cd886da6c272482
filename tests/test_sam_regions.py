"""Region partition: label-map rules, vectorised painting, device path == stock generator, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qscore.models.sam_regions import (
    RegionRules,
    SamRegions,
    build_sam,
    finalise,
    paint,
    paint_reference,
    sam_input,
    stock_label_map,
)


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[: h // 2, w // 2 :] = (20, 200, 40)
    img[h // 2 :, w // 2 :] = rng.integers(0, 255, (h - h // 2, w - w // 2, 3))
    return img


def box(hw, y0, y1, x0, x1):
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_smaller_masks_win_and_rest_is_a_region():
    hw = (20, 20)
    big, small = box(hw, 0, 20, 0, 10), box(hw, 2, 6, 2, 6)  # small lies inside big
    labels = finalise(torch.from_numpy(paint_reference([small, big], hw)), RegionRules(min_region_frac=0.01)).numpy()
    # regions by area: big minus small (184) -> rest of image (200) ... relabelled 0..R-1 by area
    assert labels.shape == hw and labels.min() == 0
    assert sorted(np.bincount(labels.ravel()).tolist()) == [16, 184, 200]
    assert np.bincount(labels.ravel())[0] == 200  # label 0 is the largest region
    assert len(np.unique(labels[small])) == 1 and labels[small][0] != labels[0, 0]


def test_small_regions_merge_into_rest_and_cap_keeps_largest():
    hw = (40, 40)
    masks = [box(hw, 0, 40, 0, 20), box(hw, 0, 10, 20, 40), box(hw, 10, 20, 20, 40), box(hw, 20, 27, 20, 40)]
    masks.append(box(hw, 30, 32, 30, 32))  # 4 px < 1% of 1600: merged into the rest
    painted = torch.from_numpy(paint_reference(masks, hw))
    labels = finalise(painted, RegionRules(min_region_frac=0.01, r_max=16)).numpy()
    areas = np.bincount(labels.ravel())
    assert areas.tolist() == [800, 260, 200, 200, 140]  # rest: 256 unpainted + the 4 px mask
    assert labels[31, 31] == labels[35, 25]  # the tiny mask went to the rest of the image
    capped = finalise(painted, RegionRules(min_region_frac=0.01, r_max=3)).numpy()
    assert np.bincount(capped.ravel()).tolist() == [800, 600, 200]  # two largest masks + rest
    full = finalise(torch.from_numpy(paint_reference(masks[:2] + [box(hw, 10, 40, 20, 40)], hw)), RegionRules(r_max=3))
    assert np.bincount(full.numpy().ravel()).tolist() == [800, 600, 200]  # full cover: no rest needed


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_paint_matches_reference(seed):
    rng = np.random.default_rng(seed)
    hw = (16, 24)
    masks = [rng.random(hw) < p for p in rng.uniform(0.05, 0.6, 40)]
    masks += [masks[3].copy(), masks[7].copy()]  # equal areas: ties keep the given order
    painted = paint(torch.from_numpy(np.stack(masks)), chunk=7).numpy()
    np.testing.assert_array_equal(painted, paint_reference(masks, hw))


def test_label_map_covers_every_pixel_once_within_cap():
    rng = np.random.default_rng(3)
    masks = torch.from_numpy(rng.random((30, 32, 32)) < 0.3)
    labels = finalise(paint(masks), RegionRules(min_region_frac=0.002, r_max=5))
    assert labels.shape == (32, 32) and labels.dtype == torch.int64
    present = torch.unique(labels)
    assert present.tolist() == list(range(len(present))) and len(present) <= 5
    areas = torch.bincount(labels.flatten())
    assert areas.sum() == 32 * 32 and bool((areas[:-1] >= areas[1:]).all())


# (tiny random SAM) no NMS and a cap of 4: many masks to paint; NMS at 0.95: it removes masks
PARTITIONS = [
    (RegionRules(8, pred_iou_thresh=0.01, stability_score_thresh=0.5, box_nms_thresh=1.0, min_region_frac=0.01, r_max=4), 4),
    (RegionRules(8, pred_iou_thresh=0.01, stability_score_thresh=0.0, box_nms_thresh=0.95, min_region_frac=0.01), 3),
]


def check_device_path_matches_stock(device: str, rules: RegionRules, most_regions: int) -> None:
    sam = build_sam("tiny").to(device)
    images = [synthetic_image(48, 64, 0), synthetic_image(64, 40, 1), synthetic_image(64, 64, 2)]
    stock = [stock_label_map(sam, im, rules, points_per_batch=16) for im in images]
    assert max(len(np.unique(ref)) for ref in stock) == most_regions  # a real partition
    size = sam.image_encoder.img_size
    batch = torch.zeros(len(images), 3, size, size, dtype=torch.uint8)
    input_hw = []
    for b, im in enumerate(images):
        x = torch.from_numpy(sam_input(im, size)).permute(2, 0, 1)
        batch[b, :, : x.shape[1], : x.shape[2]] = x
        input_hw.append(x.shape[1:])
    ours = SamRegions(sam, rules, points_per_batch=50)(
        batch.to(device), torch.tensor(input_hw), torch.tensor([im.shape[:2] for im in images])
    )
    for ref, got in zip(stock, ours):
        np.testing.assert_array_equal(got.cpu().numpy(), ref)


@pytest.mark.parametrize("rules,most_regions", PARTITIONS)
def test_device_path_matches_stock_generator_on_tiny_sam(rules, most_regions):
    """Same tiny random SAM, same prompts and thresholds: identical label maps, also when
    images of different sizes share one batch and the prompts are chunked differently."""
    check_device_path_matches_stock("cpu", rules, most_regions)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rules,most_regions", PARTITIONS)
def test_device_path_matches_stock_generator_on_cuda(rules, most_regions):
    check_device_path_matches_stock("cuda", rules, most_regions)


def test_cache_roundtrip_and_salt(tmp_path):
    from qscore.cache import ArrayCache

    img = synthetic_image(8, 8, 0)
    cache = ArrayCache(tmp_path, salt="a")
    key = cache.key(img)
    assert cache.load(key) is None
    cache.save(key, {"labels": np.arange(64, dtype=np.uint8).reshape(8, 8)})
    np.testing.assert_array_equal(cache.load(key)["labels"], np.arange(64).reshape(8, 8))
    assert ArrayCache(tmp_path, salt="b").key(img) != key
    assert not list(tmp_path.rglob("*.tmp"))
