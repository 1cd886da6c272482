from __future__ import annotations

import pytest
import torch

from qscore.models.clip_common import AntonymPrompts, build_clip, encode_images

PAIRS = [("a sharp photo", "a blurry photo"), ("a clean photo", "a noisy photo")]


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip(tiny=True)


def test_build_tiny_is_frozen_eval(tiny_clip):
    model, tokenizer, mean, std, size = tiny_clip
    assert size == 32 and len(mean) == len(std) == 3
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer(["a photo"]).shape == (1, 77)
    with pytest.raises(ValueError):
        build_clip(pretrained_path="x.bin", tiny=True)


def test_pair_probabilities_sum_to_one(tiny_clip):
    model, tokenizer, *_ = tiny_clip
    feats = torch.randn(6, 32)
    p = AntonymPrompts(model, tokenizer, PAIRS)(feats)
    q = AntonymPrompts(model, tokenizer, [(b, a) for a, b in PAIRS])(feats)
    assert p.shape == (6, 2) and ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(p + q, torch.ones_like(p))


def test_matches_the_formula_and_ignores_feature_scale(tiny_clip):
    model, tokenizer, *_ = tiny_clip
    prompts = AntonymPrompts(model, tokenizer, PAIRS, template="{}.")
    feats = torch.randn(3, 32)
    text = torch.nn.functional.normalize(model.encode_text(tokenizer([t + "." for p in PAIRS for t in p])), dim=-1)
    cos = torch.nn.functional.normalize(feats, dim=-1) @ text.T  # (3, 4)
    expected = torch.stack([(100 * cos[:, 2 * k : 2 * k + 2]).softmax(-1)[:, 0] for k in range(2)], 1)
    torch.testing.assert_close(prompts(feats), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prompts(7.0 * feats), prompts(feats))


def test_text_features_computed_once_until_reset(tiny_clip):
    model, tokenizer, *_ = tiny_clip
    prompts = AntonymPrompts(model, tokenizer, PAIRS)
    calls = []
    encode = prompts._encode_text
    prompts._encode_text = lambda t: calls.append(1) or encode(t)
    for _ in range(3):
        prompts(torch.randn(2, 32))
    assert len(calls) == 1 and prompts.features().shape == (2, 2, 32)
    assert prompts.state_dict() == {}  # nothing of the prompts is saved in checkpoints
    prompts.reset()
    prompts(torch.randn(2, 32))
    assert len(calls) == 2


def test_encode_images_chunking_is_exact(tiny_clip):
    model, *_ = tiny_clip
    x = torch.randn(5, 3, 32, 32)
    whole = encode_images(model, x)
    torch.testing.assert_close(encode_images(model, x, chunk=2), whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(whole.norm(dim=-1), torch.ones(5))
