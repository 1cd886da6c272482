"""Q-CLIP on the CPU with the tiny preset (a PE-shaped micro CLIP, random weights)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from qscore.models import qclip
from qscore.models.qclip import LEVELS, QCLIP
from qscore.types import Item, MissingWeights

S = 64  # tiny input side
JUMPS = [3, 7, 14, 19, 26, 33, 38, 45]  # one motion event in each of 8 segments of 6 frames


def make_model(seed: int = 0, **overrides) -> QCLIP:
    torch.manual_seed(seed)
    return QCLIP(QCLIP.make_config("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def model() -> QCLIP:
    return make_model()


def frames(b: int = 4, t: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, 3, S, S), generator=g, dtype=torch.uint8)


def write_video(path: Path, pictures: np.ndarray, fps: int = 25) -> Path:
    """uint8 (N, H, W, 3) -> near-lossless H.264 (so frame differences survive compression)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = pictures.shape[2], pictures.shape[1], "yuv444p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for picture in pictures:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return path


def item(path: Path) -> Item:
    return Item(str(path), path.name, path.stat().st_size, path.stat().st_mtime)


@pytest.fixture(scope="module")
def motion_video(tmp_path_factory) -> Path:
    """48 frames of a static texture with a bright square that jumps at the JUMPS frames only."""
    rng = np.random.default_rng(0)
    background = np.repeat(np.repeat(rng.integers(40, 90, (12, 16, 3), dtype=np.uint8), 4, 0), 4, 1)  # 48x64
    pictures, x = [], 0
    for f in range(48):
        if f in JUMPS:
            x = (x + 24) % 48
        picture = background.copy()
        picture[12:36, x : x + 16] = 230
        pictures.append(picture)
    return write_video(tmp_path_factory.mktemp("motion") / "motion.mp4", np.stack(pictures))


# ---- structure -------------------------------------------------------------------------------------
def test_shapes_and_rows(model):
    with torch.no_grad():
        out = model({"frames": frames(3)})
    assert out["score"].shape == (3,) and out["sims"].shape == (3, len(LEVELS))
    assert torch.isfinite(out["score"]).all() and (out["sims"].abs() <= 1 + 1e-5).all()
    rows = model.postprocess(out, [None] * 3)
    assert set(rows[0].columns) == {"score", *QCLIP.spec.columns} and rows[1].columns["score"] == pytest.approx(float(out["score"][1]))
    assert model.prompt_ids.shape == (5, 32) and model.size == S


def test_preparer_decodes_8_squashed_frames(model, motion_video):
    sample = model.preparer()(item(motion_video))
    x = sample.inputs["frames"]
    assert x.shape == (8, 3, S, S) and x.dtype == torch.uint8  # 64x48 video squashed to 64x64
    assert len(sample.facts["frames_used"]) == 8 and sample.facts["n_frames"] == 48
    assert model({"frames": x[None]})["score"].shape == (1,)


def test_frozen_and_trainable_split(model):
    trainable = model.trainable_parameters()
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in trainable} == head_ids
    assert all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == head_ids
    # tiny: width 64, bottleneck 16, 2 adapted layers, 3 context vectors, 4 scales, 5 -> 1 map
    w, r, n = 64, 16, 2
    scma = n * (w * r + r + r * w + w + 2 * w) + 2 * (r * r + r)
    proj = (w * r + r) + (r * r + r) + (r * w + w)
    assert sum(p.numel() for p in trainable) == scma + proj + 3 * w + 4 + 5


def test_default_trainable_count_is_the_released_codes():
    with torch.device("meta"):  # what `qscore models` does: no memory allocated
        big = QCLIP(QCLIP.make_config())
    w, r, n = 1024, 128, 6
    expected = n * (w * r + r + r * w + w + 2 * w) + 2 * (r * r + r) + (w * r + r) + (r * r + r) + (r * w + w) + 3 * w + 9
    assert sum(p.numel() for p in big.trainable_parameters()) == expected == 1_907_977
    assert sum(p.numel() for p in big.parameters()) > 600e6
    assert len(big.clip.visual.trunk.blocks) == 24 and big.size == 336


def test_adapters_hook_the_last_blocks_of_both_towers(model):
    trunk, text = model.clip.visual.trunk, model.clip.text
    for blocks in (trunk.blocks, text.transformer.resblocks):
        assert [len(b._forward_hooks) for b in blocks] == [0, 0, 1, 1]
    x = (frames(2).flatten(0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        adapted = model.clip.visual(x)
        model.zero_shot = True  # hooks off: the plain backbone
        plain = model.clip.visual(x)
        model.zero_shot = False
        with torch.no_grad():
            saved = [model.head.a_v.clone(), model.head.b_v.clone()]
            model.head.a_v.zero_(), model.head.b_v.zero_()
        zeroed = model.clip.visual(x)
        model.head.a_v.copy_(saved[0]), model.head.b_v.copy_(saved[1])
    assert not torch.allclose(adapted, plain)
    torch.testing.assert_close(zeroed, plain)  # a = b = 0 is exactly the frozen tower


def test_gradients_reach_every_trainable_tensor_and_nothing_else():
    m = make_model(1).train()
    loss = m.training_loss({"frames": frames(4, seed=3)}, torch.tensor([1.0, 4.0, 2.0, 3.0]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters())
    assert all(p.grad is None for p in m.clip.parameters())
    assert not m.clip.training  # the frozen towers stay in eval mode


# ---- prompts -----------------------------------------------------------------------------------------
def test_prompt_features_computed_once_per_run_until_trained():
    m = make_model(2)
    calls = []
    encode = m.encode_prompts
    m.encode_prompts = lambda: calls.append(1) or encode()
    with torch.inference_mode():
        for _ in range(3):
            m({"frames": frames(2)})
    assert len(calls) == 1
    with torch.no_grad():  # an evaluation outside inference mode reuses it too
        m({"frames": frames(1)})
    assert len(calls) == 1

    m.train()
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    for _ in range(2):  # training: fresh features every step (the context gets gradients)
        m.training_loss({"frames": frames(3)}, torch.tensor([1.0, 2.0, 3.0])).backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 3
    m.eval()
    with torch.inference_mode():
        before = m.prompt_features().clone()
        m({"frames": frames(2)})
        m({"frames": frames(2)})
    assert len(calls) == 4  # the optimiser steps invalidated the cache once
    with torch.no_grad():
        m.head.context.add_(0.5)
    assert not torch.allclose(m.prompt_features(), before) and len(calls) == 5


def test_context_starts_from_the_x_embeddings(model):
    x_id = model.prompt_ids[0, 1]
    assert (model.prompt_ids[:, 1:4] == x_id).all()
    torch.testing.assert_close(model.head.context.detach(), model.clip.text.token_embedding.weight[x_id].expand(3, -1))


# ---- samplers ---------------------------------------------------------------------------------------
def test_uniform_sampler_spreads_frames(model, motion_video):
    sample = model.preparer()(item(motion_video))
    expected = np.round(np.linspace(0, 47, 8)).astype(int).tolist()
    assert sample.facts["frames_used"] == expected
    assert square_positions(sample.inputs["frames"]) == [position_at(f) for f in expected]  # those frames


def test_framediff_sampler_picks_the_motion_frames(motion_video):
    sample = make_model(sampler="framediff").preparer()(item(motion_video))
    assert sample.facts["frames_used"] == JUMPS
    assert square_positions(sample.inputs["frames"]) == [position_at(f) for f in JUMPS]


def position_at(frame: int) -> int:
    return 24 * sum(j <= frame for j in JUMPS) % 48


def square_positions(x: torch.Tensor) -> list[int]:
    """Left edge (in source pixels, 64 wide) of the bright square in each squashed frame."""
    bright = (x[:, :, 20:40].float().mean((1, 2)) > 180).float()  # (T, S) columns of the square
    return [int(round(float(torch.nonzero(row)[0]) / 8)) * 8 for row in bright]


def test_unknown_sampler_is_a_config_error():
    with pytest.raises(ValueError, match="sampler"):
        QCLIP(QCLIP.make_config("tiny", sampler="random"))


# ---- loss ---------------------------------------------------------------------------------------------
def test_loss_is_plcc_plus_rank_by_hand_and_scale_invariant():
    m = make_model(3).train()
    batch = {"frames": frames(5, seed=7)}
    targets = torch.tensor([3.1, 1.2, 4.8, 2.2, 4.0])
    with torch.no_grad():
        m.head.score_map.weight.mul_(1e3)  # random towers barely vary: keep std(pred) >> the loss's eps
        loss = float(m.training_loss(batch, targets))
        pred = m(batch)["score"].double().numpy()
    t = targets.double().numpy()
    z = (pred - pred.mean()) / pred.std()
    plcc = 1 - stats.pearsonr(pred, t)[0]
    pairs = [(i, j) for i in range(5) for j in range(5) if t[i] > t[j]]
    rank = sum(max(0.0, z[j] - z[i]) for i, j in pairs) / len(pairs)
    assert loss == pytest.approx(plcc + 0.3 * rank, abs=1e-5)
    with torch.no_grad():
        assert float(m.training_loss(batch, 10 * targets + 3)) == pytest.approx(loss, abs=1e-5)
        m.head.score_map.weight.mul_(7.0)  # the score's scale is free
        assert float(m.training_loss(batch, targets)) == pytest.approx(loss, abs=1e-4)


# ---- determinism and the runner ---------------------------------------------------------------------
def test_same_scores_for_batch_sizes_and_fresh_models(model):
    x, fresh = frames(4, seed=11), make_model()
    with torch.inference_mode():
        whole = model({"frames": x})["score"]
        one_by_one = torch.cat([model({"frames": x[i : i + 1]})["score"] for i in range(4)])
        again = fresh({"frames": x})["score"]
    torch.testing.assert_close(one_by_one, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, whole, rtol=0, atol=0)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(1)
    for i in range(4):
        base = rng.integers(0, 255, (12, 20, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
        pictures = np.stack([np.roll(base, 2 * t * (i + 1), axis=1) for t in range(12)])
        write_video(folder / f"clip{i}.mp4", pictures)
    return folder


def test_runner_rows_same_for_batch_1_and_4_and_two_runs(clips, tmp_path):
    from qscore.runner import RunConfig, run

    scores = []
    for run_id, batch in enumerate((1, 4, 4)):
        out = tmp_path / f"out{run_id}"
        cfg = RunConfig(task="video", model="qclip", inputs=[str(clips)], out=out, preset="tiny", weights="random",
                        batch_size=batch, workers=0, quiet=True, overrides={"sampler": "framediff"})
        assert run(cfg) == 0
        table = pq.read_table(out / "qclip.parquet").to_pandas().sort_values("rel_path")
        assert (table["status"] == "ok").all() and (table["head"] == "random").all()
        assert table["frames_used"].map(len).eq(8).all() and table["sim_good"].notna().all()
        scores.append(table["score"].to_numpy())
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(scores[1], scores[2])


# ---- weights -----------------------------------------------------------------------------------------
class FakeRegistry:
    """The ``qscore.weights.Registry`` calls Q-CLIP makes, over local files."""

    def __init__(self, files: dict[str, Path | None]):
        self.files = files

    def keys(self) -> list[str]:
        return list(self.files)

    def entry(self, key: str):
        return type("Entry", (), {"kind": "none" if self.files[key] is None else "path"})()

    def path(self, key: str) -> Path:
        if self.files.get(key) is None:
            raise MissingWeights(f"{key} has no file yet")
        return self.files[key]


@pytest.fixture
def pe_checkpoint(tmp_path, monkeypatch) -> Path:
    """A 'PE' checkpoint for the micro backbone, in open_clip's key layout."""
    from safetensors.torch import save_file

    monkeypatch.setitem(qclip.OFFICIAL_BACKBONES, "qscore-pe-micro", "pe-core-l14-336")
    torch.manual_seed(123)
    clip, _ = qclip.create_backbone("qscore-pe-micro")
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def test_official_backbone_without_head_is_zero_shot(pe_checkpoint, motion_video):
    m = make_model()
    weights_id, head = m.load(None, FakeRegistry({"pe-core-l14-336": pe_checkpoint, "qclip-head": None}))
    assert head == "zero-shot" and "zero-shot" in weights_id
    from safetensors.torch import load_file

    saved = load_file(pe_checkpoint)
    torch.testing.assert_close(m.clip.visual.trunk.blocks[0].attn.qkv.weight, saved["visual.trunk.blocks.0.attn.qkv.weight"])
    x_id = m.prompt_ids[0, 1]
    torch.testing.assert_close(m.head.context.detach()[0], saved["text.token_embedding.weight"][x_id])
    with torch.inference_mode():
        out = m({"frames": frames(3)})
    expected = (100 * out["sims"]).softmax(-1) @ torch.arange(1.0, 6.0)
    torch.testing.assert_close(out["score"], expected)
    assert ((out["score"] >= 1) & (out["score"] <= 5)).all()
    m.train()  # `qscore train` from the official backbone trains the head: adapters on
    assert not m.zero_shot and m.training_loss({"frames": frames(3)}, torch.tensor([1.0, 2.0, 3.0])).requires_grad


def test_checkpoint_of_a_random_backbone_run_restores_every_tensor(tmp_path):
    from qscore.weights import save_checkpoint

    trained = make_model(5)
    ckpt = save_checkpoint(tmp_path / "best.safetensors", trained.state_dict(), {"model": "qclip", "backbone": "random"})
    m = make_model(6)  # another random backbone: it must be replaced by the trained run's
    assert m.load(str(tmp_path / "best.safetensors"), FakeRegistry({})) == (ckpt["weights_id"], "trained")
    x = frames(2)
    with torch.inference_mode():
        torch.testing.assert_close(m({"frames": x})["score"], trained({"frames": x})["score"])


def test_official_head_slot_and_trained_checkpoint(pe_checkpoint, tmp_path):
    from safetensors.torch import save_file

    from qscore.weights import save_checkpoint

    trained = make_model(5)
    state = {f"head.{k}": v for k, v in trained.head.state_dict().items()}
    head_file = tmp_path / "head.safetensors"
    save_file(state, str(head_file))
    registry = FakeRegistry({"pe-core-l14-336": pe_checkpoint, "qclip-head": head_file})
    m = make_model()
    weights_id, head = m.load(None, registry)
    assert head == "trained" and weights_id.startswith("qclip-head:sha256:")
    torch.testing.assert_close(m.head.score_map.weight, trained.head.score_map.weight)

    ckpt = tmp_path / "run" / "best.safetensors"
    save_checkpoint(ckpt, state, {"model": "qclip", "preset": "tiny", "backbone": "official"})
    m2 = make_model(9)
    assert m2.load(str(ckpt), registry)[1] == "trained" and not m2.zero_shot
    torch.testing.assert_close(m2.head.context, trained.head.context)
    torch.testing.assert_close(m2.clip.text.ln_final.weight, m.clip.text.ln_final.weight)  # official backbone


def test_declared_but_missing_head_is_an_error_not_zero_shot(pe_checkpoint, tmp_path):
    class Declared(FakeRegistry):
        def entry(self, key):
            return type("Entry", (), {"kind": "url"})()

    registry = Declared({"pe-core-l14-336": pe_checkpoint, "qclip-head": None})
    with pytest.raises(MissingWeights):
        make_model().load(None, registry)


def test_tiny_has_no_official_weights():
    with pytest.raises(MissingWeights, match="no official weights"):
        make_model().load(None, FakeRegistry({}))


# ---- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_preset_bf16_on_gpu():
    torch.manual_seed(0)
    m = QCLIP(QCLIP.make_config()).cuda().eval()
    x = torch.randint(0, 256, (2, 8, 3, 336, 336), dtype=torch.uint8, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        out = m({"frames": x})
        again = m({"frames": x[:1]})
    assert out["score"].shape == (2,) and torch.isfinite(out["score"]).all()
    torch.testing.assert_close(again["score"].float(), out["score"][:1].float(), atol=2e-2, rtol=2e-2)
