"""NVDEC itself (needs CUDA and PyNvVideoCodec): for every video model's sampler, the GPU decoder
serves the same frame positions as the CPU one, with pixels and scores within the tolerances
docs/benchmarks.md states, on 720p clips with a keyframe every 2 s and with one keyframe."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qscore.bench import synthesize
from qscore.media import nvdec, video
from qscore.media.discover import discover
from qscore.models.clifvqa import CLiFVQAPrepare
from qscore.models.mvqa import USDSPreparer
from qscore.models.qclip import QCLIPPrepare
from qscore.runner import RunConfig, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not nvdec.available(), reason="needs CUDA and PyNvVideoCodec")]

PIXEL_MEAN = 4.0  # mean |CPU - GPU| per channel value (0-255) of a model input, at most (scaled: ~3.3 on sharp blocks)
SCORE_REL = 0.05  # |CPU - GPU| score over the largest |score|, at most
SCORE_ABS = 1e-4  # or this far apart: an untrained Q-CLIP tiny scores ~1e-4, where 5 % is below bf16 noise

PREPARERS = {
    "qclip slack 1": QCLIPPrepare(8, 336, "uniform", 1),
    "qclip exact": QCLIPPrepare(8, 336, "uniform", 0),
    "qclip framediff": QCLIPPrepare(8, 336, "framediff", 1),
    "mvqa": USDSPreparer(32, 2, 1, 7, 32, 0),
    "clifvqa": CLiFVQAPrepare(8, "uniform", 1, 224, (3, 3), False, 7, 32, False, 3840, 0),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvdec")
    for gop in (50, 250):
        synthesize("video720", 2, root / f"g{gop}", gop=gop)
    return root


def prepared(decoder: str, prepare, item):
    before = video.configure(decoder, 1)
    try:
        return prepare(item)
    finally:
        video.configure(before.decoder, before.threads)


@pytest.mark.parametrize("name", PREPARERS)
def test_same_frames_on_both_decoders(clips, name):
    for item in discover([str(clips)], "video"):
        cpu, gpu = prepared("cpu", PREPARERS[name], item), prepared("gpu", PREPARERS[name], item)
        assert gpu.facts["decoder"] == "nvdec", gpu.facts["decode_warnings"]
        assert gpu.facts["frames_used"] == cpu.facts["frames_used"]
        for key, want in cpu.inputs.items():
            got = gpu.inputs[key]
            assert got.device.type == "cuda" and got.shape == want.shape and got.dtype == want.dtype
            diff = (got.cpu().float() - want.float()).abs()
            print(f"{name} {item.rel_path} {key}: mean |cpu-gpu| {diff.mean():.3f}, p99 {diff.flatten().quantile(0.99):.0f}, max {diff.max():.0f}")
            assert diff.mean() <= PIXEL_MEAN


@pytest.mark.parametrize("model,preset", [("qclip", "tiny"), ("mvqa", "tiny"), ("clifvqa", "tiny")])
def test_scores_agree_through_the_runner(clips, tmp_path, model, preset):
    rows = {}
    for decoder in ("cpu", "gpu"):
        cfg = RunConfig(task="video", model=model, inputs=[str(clips)], out=tmp_path / decoder, preset=preset,
                        weights="random", device="cuda", workers=2, batch_size=2, decoder=decoder, quiet=True)
        assert run(cfg) == 0
        rows[decoder] = {r["rel_path"]: r for r in pq.read_table(tmp_path / decoder / f"{model}.parquet").to_pylist()}
    cpu, gpu = rows["cpu"], rows["gpu"]
    assert {r["decoder"] for r in gpu.values()} == {"nvdec"} and {r["decoder"] for r in cpu.values()} == {"pyav"}
    scores = np.array([[cpu[k]["score"], gpu[k]["score"]] for k in sorted(cpu)])
    scale = max(float(np.abs(scores).max()), 1e-6)
    worst = float(np.abs(scores[:, 0] - scores[:, 1]).max()) / scale
    print(f"{model}: scores cpu {scores[:, 0].round(5).tolist()} gpu {scores[:, 1].round(5).tolist()}, max |diff| / max |score| {worst:.5f}")
    for k in cpu:
        assert gpu[k]["frames_used"] == cpu[k]["frames_used"]
    assert worst <= SCORE_REL or worst * scale <= SCORE_ABS
    torch.cuda.empty_cache()
