"""UGD-IML on the CPU with the tiny preset and random weights: noising, determinism, the class
switch, IML ignoring the reference, artefact sizes, CIML reference errors, training batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from qscore.models.ugdiml import TRAIN_STEPS, UGDIML
from qscore.train.metrics import ForgeryMeter
from qscore.types import Item, MediaError, MissingWeights


def make_model(**overrides) -> UGDIML:
    torch.manual_seed(0)
    return UGDIML(UGDIML.make_config("tiny", **overrides)).eval()


def write_image(path, h, w, seed=0) -> Item:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return item_for(path)


def item_for(path, **kw) -> Item:
    path = str(path)
    return Item(path=path, rel_path=path.rsplit("/", 1)[-1], size=len(open(path, "rb").read()), mtime=0.0, **kw)


def run(model: UGDIML, items: list[Item]):
    prepare = model.preparer()
    samples = [prepare(it) for it in items]
    with torch.inference_mode():
        outputs = model(model.collate(samples))
    return outputs, samples


@pytest.fixture(scope="module")
def model() -> UGDIML:
    return make_model()


@pytest.fixture
def images(tmp_path) -> list[Item]:
    return [write_image(tmp_path / "a.png", 37, 53, 1), write_image(tmp_path / "b.png", 64, 40, 2)]


def test_forward_noising_at_t0_returns_x0(model):
    x0 = torch.randint(0, 2, (3, 1, 8, 8)).float() * 2 - 1
    eps = torch.randn_like(x0)
    assert torch.equal(model.diffusion.add_noise(x0, eps, torch.zeros(3, dtype=torch.long)), x0)
    at_t = model.diffusion.add_noise(x0, eps, torch.full((3,), TRAIN_STEPS))
    assert torch.allclose(at_t, eps, atol=0.02)  # alpha_bar_T ~ 4e-5: pure noise
    assert model.diffusion.timesteps[0] == TRAIN_STEPS  # sampling starts from pure noise
    assert torch.equal(model.diffusion.alpha_bar, model.diffusion.scheduler.alphas_cumprod)  # one table


def test_default_builds_on_the_meta_device():  # `qscore models` counts parameters this way
    with torch.device("meta"):
        model = UGDIML(UGDIML.make_config())
    assert 20e6 < sum(p.numel() for p in model.parameters()) < 30e6


def test_same_seed_same_mask_whatever_the_batch(model, images):
    together, _ = run(model, images)
    for i, item in enumerate(images):
        alone, _ = run(model, [item])
        for key in ("prob", "std", "score"):
            torch.testing.assert_close(alone[key][0], together[key][i], atol=1e-5, rtol=0)
    again, _ = run(model, images)
    assert torch.equal(again["prob"], together["prob"])
    other_seed = make_model(seed=1)
    other, _ = run(other_seed, images)
    assert not torch.allclose(other["prob"], together["prob"])


def test_class_embedding_switches_the_output(model):
    x_t, features = torch.randn(2, 1, 32, 32), torch.randn(2, 4, 32, 32)
    t = torch.tensor([500, 500])
    with torch.inference_mode():
        iml = model.denoise(x_t, t, features, torch.tensor([False, False]))
        ciml = model.denoise(x_t, t, features, torch.tensor([True, True]))
    assert (iml - ciml).abs().max() > 1e-4


def test_iml_ignores_the_reference(model, images):
    prepare = model.preparer()
    batch = model.collate([prepare(it) for it in images])
    assert not batch["ciml"].any()
    with torch.inference_mode():
        zeros = model(batch)
        noisy = model({**batch, "reference": torch.randn_like(batch["reference"])})
        as_ciml = model({**batch, "reference": torch.randn_like(batch["reference"]), "ciml": ~batch["ciml"]})
    assert torch.equal(zeros["prob"], noisy["prob"])
    assert not torch.allclose(zeros["prob"], as_ciml["prob"])


def test_artefacts_at_original_size(model, images):
    outputs, samples = run(model, images)
    outputs = {k: v.clone() for k, v in outputs.items()}
    outputs["prob"][0, :16] = 0.9  # a known half-manipulated map for the first file
    outputs["prob"][0, 16:] = 0.1
    outputs["std"][1] = 0.25  # half the largest possible std
    results = model.postprocess(outputs, samples)
    for res, (h, w) in zip(results, [(37, 53), (64, 40)]):
        for kind in ("mask", "probability", "uncertainty"):
            assert res.artefacts[kind].shape == (h, w) and res.artefacts[kind].dtype == np.uint8
        assert set(np.unique(res.artefacts["mask"])) <= {0, 255}
        assert res.columns["manipulated_fraction"] == pytest.approx((res.artefacts["mask"] > 0).mean())
        assert res.arrays["probability"].shape == (h, w)
        assert 0 <= res.columns["forgery_score"] <= 1 and res.columns["threshold"] == 0.5
    assert results[0].columns["manipulated_fraction"] == pytest.approx(0.5, abs=0.05)
    assert (results[1].artefacts["uncertainty"] == 128).all()  # std / 0.5 x 255, rounded


def test_ciml_reference_resized_and_noted(tmp_path):
    ciml = make_model(mode="ciml")
    forged = write_image(tmp_path / "x.png", 40, 30, 3)
    write_image(tmp_path / "x.ref.png", 80, 60, 4)
    same = write_image(tmp_path / "y.png", 40, 30, 5)
    write_image(tmp_path / "y.ref.png", 40, 30, 5)
    prepare = ciml.preparer()
    resized = prepare(item_for(forged.path, reference=str(tmp_path / "x.ref.png")))
    assert "x.ref.png is 60x80, resized to the forged image's 30x40" in resized.facts["decode_warnings"]
    assert resized.inputs["ciml"] and resized.inputs["reference"].shape == (3, 32, 32)
    identical = prepare(item_for(same.path, reference=str(tmp_path / "y.ref.png")))
    assert identical.facts["decode_warnings"] is None
    assert torch.equal(identical.inputs["reference"], identical.inputs["forged"])


def test_ciml_missing_or_broken_reference_is_a_media_error(tmp_path):
    prepare = make_model(mode="ciml").preparer()
    forged = write_image(tmp_path / "x.png", 20, 20)
    with pytest.raises(MediaError, match="needs a reference"):
        prepare(forged)
    with pytest.raises(MediaError, match="reference gone.png: file not found"):
        prepare(item_for(forged.path, reference=str(tmp_path / "gone.png")))
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(MediaError, match="reference bad.png"):
        prepare(item_for(forged.path, reference=str(tmp_path / "bad.png")))


def test_training_batch_augments_image_reference_and_mask_alike(tmp_path):
    model = make_model()
    image = np.zeros((60, 90, 3), np.uint8)
    image[10:40, 50:80] = 255  # the forged region is the white block
    Image.fromarray(image).save(tmp_path / "f.png")
    Image.fromarray(np.where(image > 0, 0, 200).astype(np.uint8)).save(tmp_path / "r.png")
    Image.fromarray(image[..., 0]).save(tmp_path / "m.png")
    Image.fromarray(np.full((60, 90, 3), 90, np.uint8)).save(tmp_path / "auth.png")
    pair = item_for(tmp_path / "f.png", reference=str(tmp_path / "r.png"), mask=str(tmp_path / "m.png"))
    authentic = item_for(tmp_path / "auth.png")
    prepare = model.preparer(train=True)
    torch.manual_seed(3)
    samples = [prepare(pair) for _ in range(4)] + [prepare(authentic)]
    for s in samples[:4]:
        white = s.inputs["forged"][0] > 0  # normalised: white > 0 > black
        dark_ref = s.inputs["reference"][0] < 0
        mask = s.inputs["mask"][0].bool()
        assert mask.any() and (white == mask).float().mean() > 0.95 and (dark_ref == mask).float().mean() > 0.95
    assert len({tuple(s.inputs["mask"].flatten().tolist()) for s in samples[:4]}) > 1  # random crops/flips
    batch = model.collate(samples)
    assert batch["mask"].shape == (5, 1, 32, 32) and not batch["mask"][4].any()
    assert batch["ciml"].tolist() == [True] * 4 + [False] and "noise" not in batch
    model.train()
    loss = model.training_loss(batch, torch.tensor([1.0] * 4 + [0.0]))
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    for name in ("condition.net.0.weight", "denoiser.class_embedding.weight", "denoiser.conv_out.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_outputs_feed_the_forgery_meter(model, images):
    outputs, _ = run(model, images)
    meter = ForgeryMeter()
    gt = np.zeros((32, 32), bool)
    gt[:8] = True
    meter.add(outputs["prob"][0].numpy(), gt, float(outputs["score"][0]))
    meter.add(outputs["prob"][1].numpy(), np.zeros((32, 32), bool), float(outputs["score"][1]))
    result = meter.result()
    assert result["n_manipulated"] == 1 and result["n_authentic"] == 1
    assert 0 <= result["f1"] <= 1 and 0 <= result["iou"] <= result["f1"]


def test_no_official_weights(model, tmp_path):
    from qscore.weights import Registry

    with pytest.raises(MissingWeights, match="qscore train ugdiml"):
        model.load(None, registry=Registry({}, tmp_path, ()))


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        make_model(mode="both")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_matches_batch_of_one(images):
    model = make_model().cuda()
    prepare = model.preparer()
    samples = [prepare(it) for it in images]

    def forward(group):
        batch = {k: v.cuda() for k, v in model.collate(group).items()}
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            return {k: v.float().cpu() for k, v in model(batch).items()}

    together, alone = forward(samples), forward(samples[1:])
    assert together["prob"].shape == (2, 32, 32) and torch.isfinite(together["prob"]).all()
    torch.testing.assert_close(alone["prob"][0], together["prob"][1], atol=2e-2, rtol=0)


def test_images_at_a_larger_scale_are_strided_down_to_the_mask_size(tmp_path):
    """image_scale = 4: the preparer keeps the images at 4 x the mask side, the Condition Control
    Module brings them back to the mask side; image_scale = 1 keeps today's module layout (old
    checkpoints load)."""
    model = make_model(image_scale=4)
    item = write_image(tmp_path / "a.png", 50, 70, 1)
    sample = model.preparer()(item)
    side = model.config.size
    assert sample.inputs["forged"].shape == (3, 4 * side, 4 * side)
    assert sample.inputs["noise"].shape[-2:] == (side, side)
    features = model.condition(sample.inputs["forged"][None], sample.inputs["reference"][None], torch.tensor([False]))
    assert features.shape == (1, model.config.cond_channels, side, side)
    with torch.inference_mode():
        out = model(model.collate([sample]))
    assert out["prob"].shape == (1, side, side)
    assert sorted(make_model().condition.state_dict()) == ["net.0.bias", "net.0.weight", "net.1.bias",
                                                             "net.1.weight", "net.3.bias", "net.3.weight"]
    with pytest.raises(ValueError, match="power of two"):
        make_model(image_scale=3)


def test_residual_blocks_deepen_the_condition_module_at_every_scale(tmp_path):
    """cond_blocks = 2 with image_scale = 4: two residual blocks at 4x, 2x and 1x the mask side
    (six in all), the features still (B, C, S, S); a block starts as more than the identity and
    its gradient reaches the first convolution."""
    model = make_model(image_scale=4, cond_blocks=2)
    blocks = [m for m in model.condition.net if type(m).__name__ == "ResidualBlock"]
    assert len(blocks) == 6
    sample = model.preparer()(write_image(tmp_path / "a.png", 50, 70, 1))
    features = model.condition(sample.inputs["forged"][None], sample.inputs["reference"][None], torch.tensor([False]))
    side = model.config.size
    assert features.shape == (1, model.config.cond_channels, side, side)
    x = torch.randn(1, model.config.cond_channels, 8, 8)
    assert not torch.allclose(blocks[0](x), torch.nn.functional.silu(x))
    features.square().mean().backward()
    assert model.condition.net[0].weight.grad.abs().sum() > 0


def test_x0_prediction_learns_the_mask_with_its_loss(tmp_path):
    """prediction = sample: the loss is x0 MSE + Dice, it falls when the model is fitted to one
    batch, and sampling then returns that mask (the DDIM scheduler reads the output as x0)."""
    torch.manual_seed(0)
    model = make_model(prediction="sample", ciml_prob=1.0)
    size = model.config.size
    mask = torch.zeros(2, 1, size, size)
    mask[:, :, 8:24, 8:24] = 1
    forged = torch.randn(2, 3, size, size)
    batch = {"forged": forged, "reference": forged * (1 - mask), "ciml": torch.tensor([True, True]), "mask": mask}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        loss = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    model.eval()
    noise = torch.randn(2, model.config.samples, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prob = model({**batch, "noise": noise})["prob"]
    assert ((prob > 0.5) == mask[:, 0].bool()).float().mean() > 0.9
    with pytest.raises(ValueError, match="epsilon or sample"):
        make_model(prediction="x0")


def test_pad_fit_keeps_the_pixels_and_maps_back_only_the_image(tmp_path):
    """image_fit = pad: an image that fits the square keeps its pixels (no resampling: the traces
    stay), zeros around it; the training mask sits where the image sits; the maps written back
    are the image's part of the square, not its padding; a larger image is scaled down, aspect kept."""
    from qscore.media.sampling import IMAGENET_MEAN, IMAGENET_STD, normalize, to_tensor

    model = make_model(image_scale=4, image_fit="pad")  # mask 32, images on a 128 square
    pixels = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "f.png")
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    item = item_for(tmp_path / "f.png", mask=str(tmp_path / "m.png"))
    sample = model.preparer()(item)
    forged = sample.inputs["forged"]
    assert forged.shape == (3, 128, 128) and sample.keep["placed"] == (40, 60)
    torch.testing.assert_close(forged[:, :40, :60], normalize(to_tensor(pixels[None]), IMAGENET_MEAN, IMAGENET_STD)[0])
    assert not forged[:, 40:].any() and not forged[:, :, 60:].any()
    target = model.preparer(train=True)
    target._augmentation = lambda: ((0.0, 0.0, 1.0, 1.0), False)  # the whole image, not flipped
    placed_mask = target(item).inputs["mask"][0]  # (32, 32): the image covers 10 x 15 cells of 4 px
    expected = torch.zeros(32, 32)
    expected[:10, 8:15] = 1  # its right half, columns 30-59: cells 8-14 (cell 7 is half in)
    assert torch.equal(placed_mask, expected)
    image_cells = torch.zeros(1, 32, 32)
    image_cells[:, :12, :17] = 1.0  # probability 1 over the image (and a little beyond), 0 on the padding
    outputs = {"prob": image_cells, "std": torch.zeros(1, 32, 32), "score": torch.ones(1)}
    [out] = model.postprocess(outputs, [sample])
    assert out.artefacts["mask"].shape == (40, 60) and out.artefacts["mask"].all()
    outputs["prob"] = 1 - image_cells  # only the padding: nothing on the image
    [out] = model.postprocess(outputs, [sample])
    assert not out.artefacts["mask"].any()
    Image.fromarray(np.zeros((300, 150, 3), np.uint8)).save(tmp_path / "big.png")
    assert model.preparer()(item_for(tmp_path / "big.png")).keep["placed"] == (128, 64)
    with pytest.raises(ValueError, match="image_fit"):
        make_model(image_fit="stretch")
