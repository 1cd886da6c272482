"""One reader of ground-truth forgery masks, for training (UGD-IML's preparer) and evaluation
(pixel F1/IoU): a pixel is manipulated when its brightest channel is above 127, so a coloured
mask (pure red (255, 0, 0), as common forgery datasets draw them; its luminance is only 76) reads
the same as a white one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qscore.media.image import load_mask
from qscore.models.ugdiml import UGDIMLPrepare
from qscore.train.loop import _gt_mask
from qscore.types import MediaError


def write_mask(path, colour) -> np.ndarray:
    """A 32x48 mask: ``colour`` in a 16x24 block on black; returns the block as bool."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[8:24, 12:36] = colour
    Image.fromarray(pixels).save(path)
    truth = np.zeros((32, 48), bool)
    truth[8:24, 12:36] = True
    return truth


@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255), (128, 128, 128)])
def test_a_coloured_mask_marks_its_pixels_in_training_and_evaluation(tmp_path, colour):
    path = str(tmp_path / "mask.png")
    truth = write_mask(path, colour)
    assert np.array_equal(load_mask(path), truth)
    assert np.array_equal(_gt_mask(path, (4, 4)), truth)  # evaluation


def test_dark_colours_are_authentic(tmp_path):
    path = str(tmp_path / "mask.png")
    write_mask(path, (127, 100, 0))
    assert not load_mask(path).any()


def test_ugdiml_training_mask_is_the_same_reading(tmp_path):
    path = str(tmp_path / "mask.png")
    truth = write_mask(path, (255, 0, 0))
    prepare = UGDIMLPrepare(size=16, ciml=False, samples=1, seed=0, train=True)
    for box, flip in [((0.0, 0.0, 1.0, 1.0), False), ((0.25, 0.25, 0.5, 0.5), True)]:
        got = prepare._mask(path, box, flip, prepare._placed(*truth.shape, box))
        expected = (prepare._resize(torch.from_numpy(truth).float()[None, None], box, flip, 16)[0] > 0.5).float()
        assert got.shape == (1, 16, 16) and got.sum() > 0
        assert torch.equal(got, expected)


def test_no_mask_is_an_authentic_image_and_a_bad_one_names_itself(tmp_path):
    assert not _gt_mask(None, (4, 6)).any() and _gt_mask(None, (4, 6)).shape == (4, 6)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(MediaError, match="mask broken.png"):
        load_mask(str(bad))
