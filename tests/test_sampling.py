"""Frame and spatial samplers: exact indices, and which source pixel lands where."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qscore.types import MediaError
from qscore.media.sampling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    channels_first,
    clip_indices,
    fragments,
    framediff_indices,
    normalize,
    pairs_indices,
    sliding_windows,
    squash_resize,
    to_tensor,
    uniform_indices,
    usds,
)


def coords(t: int, h: int, w: int) -> torch.Tensor:
    """(t, 3, h, w) whose channels hold each pixel's row, column and frame number."""
    y = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    x = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    return torch.stack([torch.stack([y, x, torch.full((h, w), float(i))]) for i in range(t)])


# ---- frame indices --------------------------------------------------------------------------
def test_pairs_indices():
    assert pairs_indices(32, 8) == [0, 1, 10, 11, 20, 21, 30, 31]
    assert pairs_indices(2, 4) == [0, 1, 0, 1]
    assert pairs_indices(1, 2) == [0, 0]
    for n in (0, 3):
        with pytest.raises(ValueError):
            pairs_indices(10, n)


def test_uniform_indices():
    assert uniform_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_indices(100, 8) == np.round(np.linspace(0, 99, 8)).astype(int).tolist()
    assert uniform_indices(3, 5) == [0, 0, 1, 2, 2]  # short video: repeats
    assert uniform_indices(1, 3) == [0, 0, 0]
    with pytest.raises(MediaError):
        uniform_indices(0, 8)


def test_clip_indices_centred_and_clamped():
    assert clip_indices(100, 32, 2) == list(range(18, 82, 2))  # span 63, centred
    assert clip_indices(63, 32, 2) == list(range(0, 63, 2))
    short = clip_indices(40, 32, 2)  # does not fit: spans the whole video instead
    assert short[0] == 0 and short[-1] == 39 and len(short) == 32 and short == sorted(short)
    assert clip_indices(10, 32, 2) == uniform_indices(10, 32)


class FakeReader:
    """A video whose frame i is flat grey at ``levels[i]``; records what was decoded."""

    def __init__(self, levels):
        self.levels = levels
        self.n_frames = len(levels)
        self.asked = []

    def frames(self, indices, size=None):
        self.asked.append((list(indices), size))
        h, w = size
        return np.stack([np.full((h, w, 3), self.levels[i], np.uint8) for i in indices])

    def frames_near(self, indices, size=None, near=0):  # every frame is a reference frame here
        return self.frames(indices, size), list(indices)


def test_framediff_takes_the_largest_change_per_segment():
    levels = [10] * 100
    for cut, level in ((12, 80), (30, 20), (61, 200), (95, 120)):
        levels[cut:] = [level] * (100 - cut)
    reader = FakeReader(levels)
    assert framediff_indices(reader, 4, probe=100) == [12, 30, 61, 95]
    assert reader.asked[0][1] == (36, 64)  # decoded small


def test_framediff_caps_the_probes_and_handles_short_videos():
    reader = FakeReader(list(range(0, 250, 1)))
    picks = framediff_indices(reader, 8, probe=16)
    assert len(reader.asked[0][0]) == 16 and len(picks) == 8 and picks == sorted(set(picks))
    assert framediff_indices(FakeReader([5, 6, 7]), 8) == uniform_indices(3, 8)


# ---- tensor helpers -------------------------------------------------------------------------
def test_to_tensor_resize_normalize():
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = to_tensor(frames)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert torch.equal(x[1, 2, 4, 6], torch.tensor(frames[1, 4, 6, 2] / 255.0, dtype=torch.float32))
    assert to_tensor(frames[0]).shape == (3, 5, 7)
    assert squash_resize(x, (10, 3)).shape == (2, 3, 10, 3) and squash_resize(x[0], 4).shape == (3, 4, 4)
    flat = torch.full((1, 3, 40, 60), 0.25)
    assert torch.allclose(squash_resize(flat, 8), torch.full((1, 3, 8, 8), 0.25))
    n = normalize(torch.ones(3, 2, 2) * 0.485, IMAGENET_MEAN, IMAGENET_STD)
    assert n[0].abs().max() < 1e-6 and n[1, 0, 0] == pytest.approx((0.485 - 0.456) / 0.224)


# ---- fragments and USDS ---------------------------------------------------------------------
def test_fragments_are_native_patches_inside_their_cells():
    x = coords(3, 300, 420)
    out = fragments(x, grid=7, patch=32, seed=5)
    assert out.shape == (3, 3, 224, 224)
    cell_h, cell_w = 300 / 7, 420 / 7
    for i in range(7):
        for j in range(7):
            p = out[:, :, i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32]
            y0, x0 = p[0, 0, 0, 0].item(), p[0, 1, 0, 0].item()
            assert torch.equal(p[:, 0, :, 0], y0 + torch.arange(32.0).expand(3, 32))  # native rows
            assert torch.equal(p[:, 1, 0, :], x0 + torch.arange(32.0).expand(3, 32))  # native cols
            assert int(i * cell_h) <= y0 and y0 + 32 <= int((i + 1) * cell_h) + 1
            assert int(j * cell_w) <= x0 and x0 + 32 <= int((j + 1) * cell_w) + 1
    assert torch.equal(out[:, 2, 0, 0], torch.tensor([0.0, 1.0, 2.0]))  # frames keep their order


def test_fragments_seeded_and_grouped():
    x = coords(4, 400, 500)
    a, b = fragments(x, seed=1), fragments(x, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, :2], fragments(x, seed=2)[:, :2])
    shared = fragments(x, seed=1)
    assert torch.equal(shared[0, :2], shared[3, :2])  # one offset per cell for all frames
    grouped = fragments(x, seed=1, group=2)
    assert torch.equal(grouped[0, :2], grouped[1, :2]) and torch.equal(grouped[2, :2], grouped[3, :2])
    assert not torch.equal(grouped[0, :2], grouped[2, :2])


def test_small_frames_are_upsampled_before_fragments():
    x = coords(1, 90, 160)  # smaller than 224 on both sides
    out = fragments(x, seed=0)
    assert out.shape == (1, 3, 224, 224)
    assert 0 <= out[:, 0].min() and out[:, 0].max() <= 89.001 and out[:, 1].max() <= 159.001
    assert out[0, 0, :, 0].max() - out[0, 0, :, 0].min() > 70  # rows spread over the whole frame


def test_usds_geometry():
    x = coords(2, 448, 672)
    out = usds(x, grid=7, patch=32, seed=9)
    frag = fragments(x, grid=7, patch=32, seed=9)
    low = squash_resize(x, 112)
    assert out.shape == (2, 3, 224, 224)
    replaced = torch.zeros(224, 224, dtype=torch.bool)
    for i in range(7):
        for j in range(7):
            q = out[:, :, i * 32 + 16 : (i + 1) * 32, j * 32 + 16 : (j + 1) * 32]
            assert torch.equal(q, low[:, :, i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16])
            # tile (i, j) of the low-res frame covers the (i, j) 64 x 96 block of the original
            assert q[:, 0].mean().item() == pytest.approx(i * 64 + 31.5, abs=1.0)
            assert q[:, 1].mean().item() == pytest.approx(j * 96 + 47.5, abs=1.0)
            replaced[i * 32 + 16 : (i + 1) * 32, j * 32 + 16 : (j + 1) * 32] = True
    assert replaced.sum() == 49 * 16 * 16
    assert torch.equal(out[..., ~replaced], frag[..., ~replaced])  # the other 3 quadrants: native


# ---- sliding windows ------------------------------------------------------------------------
def covered(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    for y0, x0, y1, x1 in boxes.tolist():
        mask[y0:y1, x0:x1] = True
    return mask


def test_windows_cover_the_frame_at_native_resolution():
    x = coords(2, 480, 640)
    windows, boxes = sliding_windows(x, size=224, grid=(3, 3))
    assert windows.shape == (2, 9, 3, 224, 224) and boxes.shape == (9, 4)
    assert covered(boxes, 480, 640).all()
    assert boxes[:, 0].tolist() == [0, 0, 0, 128, 128, 128, 256, 256, 256]  # even spacing
    for g, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        assert (y1 - y0, x1 - x0) == (224, 224)
        assert torch.equal(windows[:, g], x[:, :, y0:y1, x0:x1])


def test_windows_of_small_frames_report_original_boxes():
    x = coords(1, 120, 300)
    windows, boxes = sliding_windows(x, size=224, grid=(3, 3))
    assert windows.shape == (1, 9, 3, 224, 224)
    assert covered(boxes, 120, 300).all()
    assert boxes[:, 2].max() <= 120 and boxes[:, 3].max() <= 300 and boxes.min() >= 0
    for g, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        w = windows[0, g]
        assert y0 - 1 <= w[0].min() and w[0].max() <= y1  # pixels come from inside the box
        assert x0 - 1 <= w[1].min() and w[1].max() <= x1


def test_samplers_on_uint8_views_match_the_float_path():
    """Decoded frames go through the samplers as uint8 views (no float copy): fragments and
    windows are the same pixels, resized tiles within one level of the float result."""
    frames = np.random.default_rng(0).integers(0, 256, (3, 250, 400, 3), dtype=np.uint8)
    u8, f = channels_first(frames), to_tensor(frames)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 3, 250, 400) and u8.data_ptr() == torch.from_numpy(frames).data_ptr()
    assert torch.equal(fragments(u8, 7, 32, seed=3).float(), fragments(f, 7, 32, seed=3) * 255)
    assert torch.equal(sliding_windows(u8, 224, (2, 2))[0].float(), sliding_windows(f, 224, (2, 2))[0] * 255)
    assert (squash_resize(u8, 112).float() - squash_resize(f, 112) * 255).abs().max() <= 1.0
    assert (usds(u8, 7, 32, seed=3).float() - usds(f, 7, 32, seed=3) * 255).abs().max() <= 1.0
