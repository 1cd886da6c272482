from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qscore.models.clifvqa import CLiFVQA, parse_pairs, window_heat
from qscore.train.synth import encode_mp4
from qscore.types import Item, MissingWeights


def make_video(path, frames: np.ndarray) -> Item:
    encode_mp4(path, frames, fps=8, crf=4)
    st = path.stat()
    return Item(str(path), path.name, st.st_size, st.st_mtime)


def texture(rng: np.random.Generator, t: int, h: int, w: int) -> np.ndarray:
    """Moving random texture: uint8 (T, H, W, 3) with detail at every scale."""
    base = rng.integers(0, 256, (h, w + 2 * t, 3), dtype=np.uint8)
    return np.stack([base[:, 2 * i : 2 * i + w] for i in range(t)])


def model_for(**overrides) -> CLiFVQA:
    torch.manual_seed(0)
    return CLiFVQA(CLiFVQA.make_config("tiny", **overrides)).eval()


def score(model: CLiFVQA, items: list[Item]):
    prepare = model.preparer()
    samples = [prepare(it) for it in items]
    with torch.inference_mode():
        outputs = model(model.collate(samples))
    return model.postprocess({k: v.float() for k, v in outputs.items()}, samples), samples


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("clifvqa")
    return [make_video(folder / f"v{i}.mp4", texture(rng, 10, 48, 80)) for i in range(3)]


@pytest.mark.parametrize("size", [(48, 80), (96, 64), (20, 24), (160, 200)])
def test_window_grid_spans_the_frame(tmp_path, size):
    """Windows run corner to corner, evenly spaced, tiling the frame when 3 windows are enough
    and also when the frame is smaller than one window (upsampled); the heat map is defined
    everywhere, at the frame's size."""
    model = model_for(window_grid=(3, 3))
    item = make_video(tmp_path / "v.mp4", texture(np.random.default_rng(1), 6, *size))
    sample = model.preparer()(item)
    boxes, (h, w) = sample.keep["boxes"], sample.keep["size"]
    assert (h, w) == size and boxes.shape == (9, 4)
    assert sample.inputs["windows"].shape == (4, 9, 3, 32, 32)
    used = sample.facts["frames_used"]  # uniform [0, 2, 3, 5], each may move 1 to a reference frame
    assert len(set(used)) == 4 and all(abs(u - r) <= 1 for u, r in zip(used, [0, 2, 3, 5]))
    assert sample.facts["width"] == size[1]
    assert tuple(boxes[0, :2]) == (0, 0) and tuple(boxes[-1, 2:]) == (h, w)
    covered = np.zeros(size, bool)
    for y0, x0, y1, x1 in boxes:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        covered[y0:y1, x0:x1] = True
    assert covered.all() == (max(size) <= 3 * 32)
    heat = window_heat(np.arange(9.0), boxes, (3, 3), size)
    assert heat.shape == size and heat[0, 0] < heat[-1, -1]
    if min(size) >= 32:  # native windows: each corner pixel lies in its corner window only
        assert heat[0, 0] == 0 and heat[-1, -1] == 8


def test_feeling_pairs_sum_to_one(videos):
    """p(positive) + p(negative) = 1 for every pair, through the whole model."""
    pairs = "sharp/blurry, clean/noisy"
    swapped = ", ".join(f"{b}/{a}" for a, b in parse_pairs(pairs))
    for variant in ("mixed", "decoupled"):
        a, _ = score(model_for(variant=variant, objective=pairs), videos[:1])
        b, _ = score(model_for(variant=variant, objective=swapped), videos[:1])
        fa = np.array([a[0].columns["feel_sharp"], a[0].columns["feel_clean"]])
        fb = np.array([b[0].columns["feel_blurry"], b[0].columns["feel_noisy"]])
        np.testing.assert_allclose(fa + fb, 1.0, atol=1e-5)


def test_window_heat_averages_overlaps_and_fills_gaps():
    boxes = np.array([[0, 0, 2, 2], [0, 1, 2, 3]])  # y0, x0, y1, x1: a 1 x 2 grid, overlapping
    heat = window_heat(np.array([0.0, 1.0]), boxes, (1, 2), (3, 3))
    np.testing.assert_allclose(heat, [[0, 0.5, 1]] * 3)  # row 2 (uncovered) takes the nearest
    assert heat.dtype == np.float32
    boxes = np.array([[0, 0, 1, 1], [0, 4, 1, 5], [2, 0, 3, 1], [2, 4, 3, 5]])  # 2 x 2 with gaps
    heat = window_heat(np.array([1.0, 2.0, 3.0, 4.0]), boxes, (2, 2), (3, 5))
    np.testing.assert_allclose(heat, [[1, 1, 1.5, 2, 2], [2, 2, 2.5, 3, 3], [3, 3, 3.5, 4, 4]])


def sharpness_stub(images: torch.Tensor, prompts):
    """A fixed scorer instead of CLIP: mean absolute Laplacian of each window -> (N, K), (N, 4)."""
    grey = images.mean(1, keepdim=True)
    lap = torch.nn.functional.conv2d(grey, torch.tensor([[[[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]]]))
    value = torch.tanh(lap.abs().mean((1, 2, 3)) * 10)
    return value[:, None].expand(-1, len(prompts.pairs)), torch.zeros(len(images), 4)


def test_heatmap_follows_a_blurred_half(tmp_path, monkeypatch):
    """Left half sharp, right half blurred: with a sharpness stub the heatmap (frame-sized, mean
    over frames) is higher on the left, the objective feeling and zero-shot score follow."""
    from scipy.ndimage import gaussian_filter

    frames = texture(np.random.default_rng(2), 6, 64, 128)
    frames[:, :, 64:] = gaussian_filter(frames[:, :, 64:], sigma=(0, 3, 3, 0))
    model = model_for(window_grid=(2, 4))
    monkeypatch.setattr(model, "feel", sharpness_stub)
    model.zero_shot = True
    [out], [sample] = score(model, [make_video(tmp_path / "half.mp4", frames)])
    heat = out.arrays["heatmap"]
    assert heat.shape == (64, 128) and out.artefacts["heatmap"].shape == (64, 128, 3)
    assert out.artefacts["heatmap"].dtype == np.uint8
    assert heat[:, :48].min() > heat[:, 80:].max()
    assert heat[:, :32].mean() > 3 * heat[:, 96:].mean()
    assert sample.keep["frame"].shape == (64, 128, 3)


def test_deterministic_and_batch_independent(videos):
    model = model_for()
    together, _ = score(model, videos)
    alone = [score(model, [v])[0][0] for v in videos]
    again, _ = score(model_for(), videos)
    for a, b, c in zip(together, alone, again):
        assert a.columns["score"] == pytest.approx(b.columns["score"], abs=1e-5)
        assert a.columns == c.columns
        np.testing.assert_array_equal(a.artefacts["heatmap"], c.artefacts["heatmap"])
    assert len({round(r.columns["score"], 6) for r in together}) == len(videos)
    model.maps = False  # --no-maps: the same scores; no frame kept for a heatmap
    bare, samples = score(model, videos)
    assert [r.columns for r in bare] == [r.columns for r in together]
    assert not bare[0].artefacts and "frame" not in samples[0].keep


@pytest.mark.parametrize("variant,sampler", [("mixed", "uniform"), ("decoupled", "framediff"), ("mixed", "pairs")])
def test_rows_have_every_feeling_column(videos, variant, sampler):
    model = model_for(variant=variant, sampler=sampler)
    [out], [sample] = score(model, videos[:1])
    assert set(CLiFVQA.spec.columns) | {"score"} == set(out.columns)
    assert all(0.0 <= out.columns[k] <= 1.0 for k in CLiFVQA.spec.columns)
    assert len(sample.facts["frames_used"]) == 4 and ("frames" in sample.inputs) == (variant == "decoupled")


def test_pairs_sampler_decodes_exact_pairs_and_sees_holds(tmp_path):
    """Consecutive pairs, decoded exactly even with frame_slack (a pair moved onto one frame would
    look like a hold), and the head gets each pair's change: near zero for the smallest pair of
    a clip whose pictures are each shown twice, not for the same motion without holds."""
    rng = np.random.default_rng(3)
    moving = texture(rng, 16, 48, 80)
    held = moving[np.arange(16) // 2 * 2]  # every picture shown twice
    items = [make_video(tmp_path / "moving.mp4", moving), make_video(tmp_path / "held.mp4", held)]
    model = model_for(sampler="pairs", frames=8, frame_slack=2)
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    (a, b), samples = score(model, items)
    assert samples[0].facts["frames_used"] == samples[1].facts["frames_used"] == [0, 1, 5, 6, 9, 10, 14, 15]
    c = model.spatial.num_features
    change_mean, change_min = seen[0][:, 2 * c : 3 * c], seen[0][:, 3 * c : 4 * c]  # (2, C): moving, held
    assert change_min[1].abs().max() < 0.1 * change_min[0].abs().mean()
    assert change_mean[1].mean() < change_mean[0].mean()
    assert a.columns["score"] != pytest.approx(b.columns["score"], abs=1e-5)
    with pytest.raises(ValueError, match="even"):
        model_for(sampler="pairs", frames=3)


def test_zero_shot_score_is_the_mean_feeling(videos):
    model = model_for()
    model.zero_shot = True
    [out], _ = score(model, videos[:1])
    assert out.columns["score"] == pytest.approx(np.mean([out.columns[k] for k in CLiFVQA.spec.columns]), abs=1e-6)


def test_training_step_updates_the_head_not_clip(videos):
    model = model_for()
    model.zero_shot = True
    batch = model.collate([model.preparer(train=True)(v) for v in videos])
    with torch.inference_mode():
        model(batch)  # caches the prompts' text features inside inference mode
    model.train()
    assert not model.zero_shot and not model.clip.training
    loss = model.training_loss(batch, torch.tensor([0.2, 0.5, 0.9]))
    loss.backward()
    assert model.head[-1].weight.grad is not None and all(p.grad is not None for p in model.spatial.parameters())
    assert all(p.grad is None for p in model.clip.parameters())
    head, spatial = model.trainable_parameters()
    assert spatial["lr_scale"] == model.config.backbone_lr_scale
    trained = {id(p) for g in (head, spatial) for p in g["params"]}
    assert trained == {id(p) for m in (model.head, model.spatial) for p in m.parameters()}


class FakeRegistry:
    """weights.toml stand-in: key -> file, or None for a declared entry without a file."""

    def __init__(self, files: dict):
        self.files = files

    def entry(self, key):
        if key not in self.files:
            raise KeyError(key)
        return SimpleNamespace(kind="none" if self.files[key] is None else "path")

    def path(self, key):
        if self.files.get(key) is None:
            raise MissingWeights(key)
        return self.files[key]


def test_load_official_with_and_without_a_head(tmp_path, videos):
    from qscore.weights import save_checkpoint

    source = model_for()
    with pytest.raises(MissingWeights):
        source.load_official(FakeRegistry({}))
    torch.save(source.clip.state_dict(), tmp_path / "clip.pt")
    card = save_checkpoint(tmp_path / "head.safetensors", dict(source.head.named_parameters(prefix="head")),
                           {"model": "clifvqa", "backbone": "official"})
    torch.manual_seed(1)
    model = CLiFVQA(source.config)
    model.config = dataclasses.replace(model.config, clip_tiny=False)  # let the tiny CLIP load a file
    feats = torch.randn(2, 32)
    before = model.window_prompts(feats)
    files = {"clip-vit-b16-openai": tmp_path / "clip.pt", "clifvqa-head": None}
    assert model.load_official(FakeRegistry(files)) == ("clip-vit-b16-openai", "zero-shot")
    assert model.zero_shot
    torch.testing.assert_close(model.window_prompts(feats), source.window_prompts(feats))
    assert not torch.allclose(before, model.window_prompts(feats))  # the text cache was reset
    files["clifvqa-head"] = tmp_path / "head.safetensors"
    assert model.load_official(FakeRegistry(files)) == (card["weights_id"], "trained")
    assert not model.zero_shot
    torch.testing.assert_close(model.head[1].weight, source.head[1].weight)


def test_random_init_checkpoint_round_trip(tmp_path, videos):
    """A checkpoint of a --init random run carries its CLIP; loading it into a model built from
    another seed gives the same scores (the prompts' text cache follows the new CLIP)."""
    from qscore.weights import save_checkpoint

    trained = model_for()
    expected, _ = score(trained, videos[:2])
    save_checkpoint(tmp_path / "c.safetensors", trained.state_dict(), {"model": "clifvqa", "backbone": "random"})
    torch.manual_seed(5)
    model = CLiFVQA(trained.config).eval()
    score(model, videos[:1])  # fills the text cache from its own random CLIP
    assert model.load(str(tmp_path / "c.safetensors"), None)[1] == "trained"
    got, _ = score(model, videos[:2])
    for a, b in zip(got, expected):
        assert a.columns == pytest.approx(b.columns, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["mixed", "decoupled"])
def test_default_preset_on_gpu(tmp_path, variant):
    """Default preset (ViT-B/16, random weights) under bf16 autocast: finite, in-range
    feelings, and a file's score does not depend on the batch it is in."""
    rng = np.random.default_rng(3)
    items = [make_video(tmp_path / f"g{i}.mp4", texture(rng, 12, 360, 640)) for i in range(3)]
    torch.manual_seed(0)
    model = CLiFVQA(CLiFVQA.make_config("default", variant=variant)).cuda().eval()
    prepare = model.preparer()
    samples = [prepare(it) for it in items]

    def run(group):
        batch = {k: v.cuda() for k, v in model.collate(group).items()}
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            return {k: v.float().cpu() for k, v in model(batch).items()}

    together = run(samples)
    assert torch.isfinite(together["score"]).all()
    assert ((together["feelings"] >= 0) & (together["feelings"] <= 1)).all()
    for i, s in enumerate(samples):
        alone = run([s])
        torch.testing.assert_close(alone["feelings"][0], together["feelings"][i], atol=2e-3, rtol=0)
        torch.testing.assert_close(alone["score"][0], together["score"][i], atol=1e-2, rtol=1e-2)
