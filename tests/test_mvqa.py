"""MVQA: USDS geometry, the VideoMamba backbone (sizes, checkpoint keys), determinism, weights
and a short learning step. CPU, the ``test`` preset, seconds."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qscore.media.sampling import clip_indices, to_tensor, usds
from qscore.media.video import open_video
from qscore.models.mvqa import MVQA, backbone_input
from qscore.types import Item, MissingWeights

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"


def make(preset="test", torch_seed=0, **overrides) -> MVQA:
    torch.manual_seed(torch_seed)
    return MVQA(MVQA.make_config(preset, **overrides)).eval()


def random_video(model: MVQA, batch=2, clips=1, seed=0) -> torch.Tensor:
    c = model.config
    side = c.grid * c.fragment
    return torch.randint(0, 256, (batch, clips, c.frames, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- USDS ----------------------------------------------------------------------------------
def coordinate_frames(frames=3, height=360, width=480) -> torch.Tensor:
    """(T, 3, H, W): channel 0 = row index, 1 = column index, 2 = frame index."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    return torch.stack([torch.stack([rows, cols, torch.full_like(rows, t)]) for t in range(frames)])


def test_usds_geometry_native_fragments_and_semantic_quadrant():
    height, width, grid, patch = 360, 480, 7, 32
    x = coordinate_frames(height=height, width=width)
    out = usds(x, grid, patch, seed=123)
    assert out.shape == (3, 3, grid * patch, grid * patch)
    half = patch // 2
    for i in range(grid):
        for j in range(grid):
            cell = out[0, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
            rows, cols = cell[0], cell[1]
            # Three quadrants: one native-resolution 32x32 window inside grid cell (i, j).
            r0, c0 = rows[0, 0].item(), cols[0, 0].item()
            native = torch.ones(patch, patch, dtype=torch.bool)
            native[half:, half:] = False
            expected_rows = r0 + torch.arange(patch, dtype=torch.float32)[:, None].expand(patch, patch)
            expected_cols = c0 + torch.arange(patch, dtype=torch.float32)[None, :].expand(patch, patch)
            assert torch.equal(rows[native], expected_rows[native]) and torch.equal(cols[native], expected_cols[native])
            assert i * height // grid <= r0 and r0 + patch <= math.ceil((i + 1) * height / grid)
            assert j * width // grid <= c0 and c0 + patch <= math.ceil((j + 1) * width / grid)
            # Bottom-right quadrant: tile (i, j) of the frame resized to (grid*half)^2, bilinear.
            low = grid * half
            a = torch.arange(half, dtype=torch.float32)
            sem_rows = (i * half + a + 0.5) * height / low - 0.5
            sem_cols = (j * half + a + 0.5) * width / low - 0.5
            assert torch.allclose(rows[half:, half:], sem_rows[:, None].expand(half, half), atol=0.6)
            assert torch.allclose(cols[half:, half:], sem_cols[None, :].expand(half, half), atol=0.6)
    assert torch.equal(out[:, 2, 0, 0], torch.arange(3, dtype=torch.float32))  # frame order kept


def test_usds_deterministic_per_seed_and_small_frames_upsampled():
    x = coordinate_frames(frames=2, height=300, width=400)
    assert torch.equal(usds(x, 7, 32, seed=5), usds(x, 7, 32, seed=5))
    assert not torch.equal(usds(x, 7, 32, seed=5), usds(x, 7, 32, seed=6))
    small = torch.rand(2, 3, 120, 160)
    assert usds(small, 7, 32, seed=0).shape == (2, 3, 224, 224)


# ---- backbone --------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, low, high", [("tiny", 6.5e6, 7.6e6), ("middle", 70e6, 78e6)])
def test_preset_sizes_match_the_paper(preset, low, high):
    with torch.device("meta"):
        model = MVQA(MVQA.make_config(preset))
    n = sum(p.numel() for p in model.parameters())
    assert low < n < high
    c = model.config
    assert model.backbone.pos_embed.shape == (1, 197, c.d_model) and len(model.backbone.layers) == c.depth
    assert model.backbone.temporal_pos_embedding.shape == (1, 32, c.d_model)


def test_forward_scores_are_batch_independent_and_deterministic():
    model = make()
    video = random_video(model, batch=3)
    with torch.no_grad():
        scores = model({"video": video})["score"]
        single = torch.cat([model({"video": video[i : i + 1]})["score"] for i in range(3)])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.allclose(scores, single, atol=1e-6)
    assert torch.equal(scores, make()({"video": video})["score"].detach())  # same seed, same model


def test_cpu_clips_go_through_the_backbone_one_by_one_side_by_side():
    """On the CPU without gradients each clip runs on its own (a thread per core), so its
    features are bitwise those it gets alone; with gradients (training) the batch runs as one."""
    model = make()
    clips = backbone_input(random_video(model, batch=3))
    alone = torch.cat([model.backbone(c) for c in clips.split(1)]).detach()
    names = []
    forward = model.backbone.forward

    def spy(x):
        names.append(threading.current_thread().name)
        return forward(x)

    model.backbone.forward = spy
    with torch.inference_mode():
        assert torch.equal(model.features(clips), alone)
    assert len(names) == 3 and all(n.startswith("qscore-mvqa") for n in names)
    names.clear()
    assert model.features(clips).requires_grad and len(names) == 1


def test_clip_spans_cover_the_video():
    prepare = make(clips=3, interval=2).preparer()
    clips = prepare.clip_frames(300)
    assert [c.tolist() for c in clips] == [[46, 48, 50, 52], [146, 148, 150, 152], [246, 248, 250, 252]]
    short = prepare.clip_frames(2)  # fewer frames than clips: every index stays in range
    assert all(0 <= i < 2 for c in short for i in c) and all(len(c) == 4 for c in short)


def test_clips_are_averaged():
    model = make(clips=2)
    video = random_video(model, batch=2, clips=2)
    with torch.no_grad():
        both = model({"video": video})["score"]
        each = torch.stack([model({"video": video[:, k : k + 1]})["score"] for k in range(2)])
    assert torch.allclose(both, each.mean(0), atol=1e-6)


def test_regression_token_sees_every_frame():
    """Token 0 comes first in time-major order: only the backward scan carries the last frame to
    it. Were that path broken its features would not change at all (bitwise)."""
    model = make()
    video = random_video(model, batch=1)
    later = video.clone()
    later[:, :, -1] = 255 - later[:, :, -1]  # change only the last frame
    with torch.no_grad():
        before, after = (model.backbone(backbone_input(v)) for v in (video, later))
    assert (after - before).norm() / before.norm() > 1e-6


# ---- VideoMamba checkpoint keys ---------------------------------------------------------------
def videomamba_state(d=32, depth=2, frames=4, grid=4, n=16, classes=400, seed=0) -> dict[str, torch.Tensor]:
    """A VideoMamba-style state dict written out from VideoMamba's naming, random values."""
    g = torch.Generator().manual_seed(seed)
    inner, rank = 2 * d, math.ceil(d / 16)
    shapes = {
        "cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d), "temporal_pos_embedding": (1, frames, d),
        "patch_embed.proj.weight": (d, 3, 1, 16, 16), "patch_embed.proj.bias": (d,),
        "norm_f.weight": (d,), "head.weight": (classes, d), "head.bias": (classes,),
    }
    for i in range(depth):
        p = f"layers.{i}."
        shapes.update({p + "norm.weight": (d,), p + "mixer.in_proj.weight": (2 * inner, d), p + "mixer.out_proj.weight": (d, inner)})
        for s in ("", "_b"):
            shapes.update({
                f"{p}mixer.conv1d{s}.weight": (inner, 1, 4), f"{p}mixer.conv1d{s}.bias": (inner,),
                f"{p}mixer.x_proj{s}.weight": (rank + 2 * n, inner),
                f"{p}mixer.dt_proj{s}.weight": (inner, rank), f"{p}mixer.dt_proj{s}.bias": (inner,),
                f"{p}mixer.A{s}_log": (inner, n), f"{p}mixer.D{s}": (inner,),
            })
    return {k: torch.randn(*v, generator=g) for k, v in shapes.items()}


def test_videomamba_checkpoint_loads_strict_on_the_backbone():
    model = make()
    state = videomamba_state()
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    ignored = model.load_videomamba(state)
    assert ignored == ["head.bias", "head.weight"]  # the 400-class head is reported, not loaded
    own = model.backbone.state_dict()
    assert set(own) == set(state) - set(ignored)
    assert all(torch.equal(own[k], state[k]) for k in own)
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items())


def test_videomamba_checkpoint_errors_and_resampling():
    model = make()
    state = videomamba_state()
    del state["layers.1.mixer.A_b_log"]
    with pytest.raises(ValueError, match="A_b_log"):
        model.load_videomamba(state)
    with pytest.raises(ValueError, match="does not fit"):
        model.load_videomamba(videomamba_state(d=48))  # a wider model
    # Kinetics checkpoints at other frame counts / resolutions: embeddings are resampled.
    ignored = model.load_videomamba(videomamba_state(frames=8, grid=7))
    assert ignored == ["head.bias", "head.weight"]
    assert model.backbone.temporal_pos_embedding.shape == (1, 4, 32)
    with torch.no_grad():
        assert torch.isfinite(model({"video": random_video(model)})["score"]).all()


# ---- weights ---------------------------------------------------------------------------------
class NoWeights:
    def entry(self, key):
        raise KeyError(key)

    def path(self, key):
        raise MissingWeights(f"{key}: not in the cache; place it at /somewhere/{key}")


def test_no_official_head_means_missing_weights_not_a_fake_score():
    with pytest.raises(MissingWeights, match="no trained weights registered as 'mvqa-head'"):
        make().load(None, NoWeights())
    assert make().load("random", NoWeights()) == ("random", "random")
    with pytest.raises(MissingWeights):
        make().load_backbone(NoWeights())  # the test preset has no VideoMamba checkpoint


class FakeRegistry:
    """weights.toml stand-in: each key maps to a local file."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def path(self, key):
        if key not in self.files:
            raise MissingWeights(f"{key} has no file yet")
        return self.files[key]


def test_trained_checkpoint_over_the_videomamba_backbone(tmp_path):
    from qscore.weights import save_checkpoint

    state = videomamba_state()
    torch.save({"model": state}, tmp_path / "videomamba.pth")  # the official files' layout
    registry = FakeRegistry({"videomamba-t16-k400": tmp_path / "videomamba.pth"})
    trained = make(torch_seed=1, backbone_weights="videomamba-t16-k400")
    head = {f"head.{k}": v for k, v in trained.head.state_dict().items()}
    save_checkpoint(tmp_path / "best.safetensors", head, {"model": "mvqa", "preset": "test", "backbone": "official"})

    model = make(backbone_weights="videomamba-t16-k400")
    weights_id, kind = model.load(str(tmp_path / "best.safetensors"), registry)
    assert kind == "trained" and weights_id.startswith("sha256:")
    assert torch.equal(model.backbone.layers[1].mixer.A_b_log, state["layers.1.mixer.A_b_log"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in head.items())
    # registered as mvqa-head, the same checkpoint is the official score
    registry.files["mvqa-head"] = tmp_path / "best.safetensors"
    assert make(backbone_weights="videomamba-t16-k400").load(None, registry) == (weights_id, "trained")


# ---- preparer ----------------------------------------------------------------------------------
@pytest.mark.skipif(not (VIDEOS / "bikes.mp4").is_file(), reason="shared test videos not present")
def test_preparer_on_a_real_video_is_deterministic_per_file():
    path = VIDEOS / "bikes.mp4"
    item = Item(str(path), "bikes.mp4", path.stat().st_size, path.stat().st_mtime)
    prepare = make().preparer()
    a, b = prepare(item), prepare(item)
    video = a.inputs["video"]
    assert video.shape == (1, 4, 3, 64, 64) and video.dtype == torch.uint8  # normalised on the device
    assert torch.equal(video, b.inputs["video"])
    assert a.facts["frames_used"] == clip_indices(a.facts["n_frames"], 4, 2)
    other = make(seed=1).preparer()(item).inputs["video"]
    assert not torch.equal(video, other)  # the run seed moves the fragments
    # USDS on uint8 = USDS on float frames: fragments exactly, semantic tiles up to rounding
    with open_video(str(path)) as reader:
        frames = to_tensor(reader.frames(a.facts["frames_used"]))
    whole = usds(frames, 2, 32, item.seed(0)) * 255
    assert (video[0].float() - whole).abs().max() <= 1.0
    renamed = Item(str(path), "other.mp4", item.size, item.mtime)
    assert not torch.equal(video, prepare(renamed).inputs["video"])


# ---- training -----------------------------------------------------------------------------------
def test_training_loss_decreases_on_a_tiny_problem():
    model = make().train()
    video = random_video(model, batch=6, seed=1)
    target = torch.linspace(0, 1, 6)
    video = (video // 2 + (127 * target).round().view(6, 1, 1, 1, 1, 1)).to(torch.uint8)  # a learnable brightness-like signal
    groups = model.trainable_parameters()
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    head = [g for g in groups if g["lr_scale"] == 1.0]
    assert {id(p) for g in head for p in g["params"]} == {id(p) for p in model.head.parameters()}
    no_decay = {id(p) for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    assert id(model.backbone.pos_embed) in no_decay and id(model.backbone.layers[0].mixer.A_b_log) in no_decay
    assert id(model.backbone.layers[0].mixer.in_proj.weight) not in no_decay
    optimiser = torch.optim.AdamW([dict(g, lr=1e-3 * g.pop("lr_scale")) for g in groups], lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model.training_loss({"video": video}, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1
    grads = [p.grad for p in model.backbone.layers[0].mixer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
