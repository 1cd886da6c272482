"""The GPU decoder's logic on the CPU: PyNvVideoCodec replaced by tests/fake_nvdec, which decodes
with PyAV and hands out NV12 surfaces as NVDEC does, so positions, the packets fed, colour
conversion, the per-file CPU fallback and the runner's --decoder (preparing threads included)
run here without a GPU; tests/test_nvdec_gpu.py decodes on NVDEC."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qscore import runner
from qscore.media import nvdec, video
from qscore.media.sampling import uniform_indices
from qscore.media.video import plan_near
from qscore.runner import RunConfig, run
from tests.badmedia import make_video


FAKE = Path(__file__).parent / "fake_nvdec"


@pytest.fixture
def fake_nvdec(monkeypatch):
    """PyNvVideoCodec replaced by tests/fake_nvdec; fresh sessions in every thread."""
    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.delitem(sys.modules, "PyNvVideoCodec", raising=False)
    import PyNvVideoCodec

    monkeypatch.setattr(nvdec, "_LOCAL", threading.local())
    monkeypatch.setattr(PyNvVideoCodec.FakeDecoder, "fail", None)
    monkeypatch.setattr(PyNvVideoCodec.FakeDecoder, "silent", None)
    monkeypatch.setattr(PyNvVideoCodec.FakeDecoder, "fed", [])
    yield PyNvVideoCodec.FakeDecoder
    sys.modules.pop("PyNvVideoCodec", None)


def test_nv12_conversion_matches_swscale(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=3, size=(64, 96))
    with av.open(str(path)) as c:
        frame = next(c.decode(c.streams.video[0]))
    want = frame.to_ndarray(format="rgb24").astype(int)
    nv12 = torch.from_numpy(frame.reformat(format="nv12").to_ndarray())
    got = nvdec.nv12_to_rgb(nv12[:64], nv12[64:]).round().permute(1, 2, 0).numpy()
    diff = np.abs(got - want)
    assert diff.mean() < 1.5 and diff.max() <= 3  # swscale's integer tables round differently


def test_scaled_nv12_conversion_matches_swscale():
    """Scaled, the planes are resized before the conversion, as swscale does: converting first
    and resizing RGB was 15.6 per channel value off on sharp 8x8 blocks (as tests/test_nvdec_gpu
    saw on the H200)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)  # 720x1280
    frame = av.VideoFrame.from_ndarray(blocks, format="rgb24").reformat(format="yuv420p")
    want = frame.reformat(width=336, height=336, format="rgb24").to_ndarray().astype(int)
    nv12 = torch.from_numpy(frame.reformat(format="nv12").to_ndarray())
    got = nvdec.nv12_to_rgb(nv12[:720], nv12[720:], size=(336, 336)).round().permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 3.0  # 1.48 measured; converting first: 15.8


def test_same_positions_and_close_pixels_as_the_cpu(tmp_path, fake_nvdec):
    path = str(make_video(tmp_path / "v.mp4", n=60, gop=25))
    want = uniform_indices(60, 8)
    with video.VideoReader(path) as cpu, nvdec.NvdecReader(path) as gpu:
        assert gpu.decoder == "nvdec"
        near_cpu, used_cpu = cpu.frames_near(want, size=(32, 32), near=1)
        near_gpu, used_gpu = gpu.frames_near(want, size=(32, 32), near=1)
        exact_cpu, exact_gpu = cpu.frames(want), gpu.frames(want)
        facts = gpu.facts()
    assert used_gpu == used_cpu and used_cpu != want  # the plan moved some frames, the same on both
    assert torch.is_tensor(near_gpu) and near_gpu.dtype == torch.uint8 and near_gpu.shape == (8, 32, 32, 3)
    assert np.abs(exact_gpu.cpu().numpy().astype(int) - exact_cpu).mean() < 1.5
    assert np.abs(near_gpu.cpu().numpy().astype(int) - near_cpu).mean() < 3  # resized after vs while converting
    assert facts["decoder"] == "nvdec" and facts["decode_warnings"] is None


def test_a_failing_file_falls_back_to_the_cpu_and_says_so(tmp_path, fake_nvdec):
    path = str(make_video(tmp_path / "bad.mp4", n=30))
    fake_nvdec.fail = "bad"
    with video.VideoReader(path) as cpu, nvdec.NvdecReader(path) as gpu:
        frames, used = gpu.frames_near([0, 10, 20], near=1)
        want, want_used = cpu.frames_near([0, 10, 20], near=1)
        facts = gpu.facts()
    assert used == want_used and np.array_equal(frames.cpu().numpy(), want)  # the CPU's frames, as tensors
    assert facts["decoder"] == "pyav" and "GPU decoder failed" in facts["decode_warnings"]


def test_a_packet_without_its_picture_is_never_served(tmp_path, fake_nvdec):
    """Pictures carry no timestamp on NVDEC's zero-latency path: they are known by the order they
    were fed in, so a packet that gives no picture fails the file (a later one would be taken for it)."""
    path = str(make_video(tmp_path / "silent.mp4", n=30))
    fake_nvdec.silent = "silent"
    with video.VideoReader(path) as cpu, nvdec.NvdecReader(path) as gpu:
        frames = gpu.frames([3, 4])
        facts = gpu.facts()
        want = cpu.frames([3, 4])
    assert facts["decoder"] == "pyav" and "0 pictures for the packet" in facts["decode_warnings"]
    assert np.array_equal(frames.cpu().numpy(), want)


def test_nvdec_is_fed_only_what_the_wanted_frames_depend_on(tmp_path, fake_nvdec):
    """The packets fed are ``packets_to_feed``'s, in decode order: fewer than the clip's."""
    path = str(make_video(tmp_path / "v.mp4", n=120, gop=40))
    with nvdec.NvdecReader(path) as gpu:
        gpu.frames_near(uniform_indices(120, 8), near=1)
        index = gpu._index
    fed = [index.position(pts, -1) for _, pts in fake_nvdec.fed]
    served = sorted(set(plan_near(uniform_indices(120, 8), index.refs, 1).values()))
    assert fed == nvdec.packets_to_feed(index, served) and len(fed) < 120


@pytest.mark.parametrize("gop,bframes", [(40, 2), (250, 2), (30, 0)])
def test_the_packets_fed_decode_to_the_same_frames(tmp_path, gop, bframes):
    """A real decoder (PyAV) fed ``packets_to_feed``'s packets only, a GOP left once its wanted
    frames are fed (as zero latency allows), gives the wanted frames bit-identical to an exact
    decode."""
    path = str(make_video(tmp_path / "v.mp4", n=150, gop=gop, bframes=bframes))
    with video.VideoReader(path) as cpu:
        index, wanted = cpu._index, sorted({3, 41, 42, 77, 120, 149})
        feed = nvdec.packets_to_feed(index, wanted)
        exact = dict(zip(wanted, cpu.frames(wanted)))
    assert set(wanted) <= set(feed) and len(feed) < index.n_frames
    got = {}
    with av.open(path) as c:
        stream = c.streams.video[0]
        packets = {index.position(pk.pts, -1): pk for pk in c.demux(stream) if pk.size}
        frames = [f for p in feed for f in stream.codec_context.decode(packets[p])] + list(stream.codec_context.decode(None))
        for f in frames:
            got[index.position(f.pts, -1)] = f.to_ndarray(format="rgb24")
    for p in wanted:
        assert np.array_equal(got[p], exact[p]), p


def test_formats_nvdec_lacks_go_to_the_cpu(tmp_path, fake_nvdec):
    with av.open(str(tmp_path / "444.mp4"), "w") as out:  # 4:4:4 H.264 (High 4:4:4)
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv444p"
        for i in range(5):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    mpeg4 = make_video(tmp_path / "m.mp4", n=5, codec="mpeg4")
    for path, why in ((tmp_path / "444.mp4", "yuv444p"), (mpeg4, "mpeg4")):
        with nvdec.NvdecReader(str(path)) as gpu:
            assert torch.is_tensor(gpu.frames([1])) and gpu.decoder == "pyav"
            assert why in gpu.facts()["decode_warnings"] and "decoded on the CPU" in gpu.facts()["decode_warnings"]


def test_pick_decoder(monkeypatch):
    assert video.pick_decoder("auto", "cpu") == "cpu" and video.pick_decoder("cpu", "cuda") == "cpu"
    monkeypatch.setattr(nvdec, "available", lambda: True)
    assert video.pick_decoder("auto", "cuda") == "cpu"  # NVDEC measured level or slower (docs/benchmarks.md)
    assert video.pick_decoder("gpu", "cuda") == "gpu"
    with pytest.raises(video.UsageError, match="needs a CUDA device"):
        video.pick_decoder("gpu", "cpu")
    with pytest.raises(video.UsageError, match="auto, cpu or gpu"):
        video.pick_decoder("fast", "cpu")


@pytest.mark.parametrize("workers", [0, 2])  # 2: preparing threads, each with its own NVDEC session
def test_run_with_the_gpu_decoder_writes_which_decoder_served_each_file(tmp_path, fake_nvdec, monkeypatch, workers):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a.mp4", "bad.mp4", "c.mp4"):
        make_video(clips / name, n=40, gop=20)
    fake_nvdec.fail = "bad"
    monkeypatch.setattr(runner, "pick_decoder", lambda choice, device_type: "gpu")

    def score(out, decoder):
        cfg = RunConfig(task="video", model="qclip", inputs=[str(clips)], out=out, preset="tiny", weights="random",
                        device="cpu", workers=workers, batch_size=2, decoder=decoder, quiet=True)
        assert run(cfg) == 0
        return {r["rel_path"]: r for r in pq.read_table(out / "qclip.parquet").to_pylist()}

    gpu = score(tmp_path / "gpu", "gpu")
    assert video.SETTINGS.decoder == "cpu"  # the run put this process's decoding back
    monkeypatch.setattr(runner, "pick_decoder", lambda choice, device_type: "cpu")
    cpu = score(tmp_path / "cpu", "cpu")
    assert {k: r["decoder"] for k, r in gpu.items()} == {"a.mp4": "nvdec", "bad.mp4": "pyav", "c.mp4": "nvdec"}
    assert "GPU decoder failed" in gpu["bad.mp4"]["decode_warnings"] and gpu["a.mp4"]["decode_warnings"] is None
    for name in gpu:
        assert gpu[name]["frames_used"] == cpu[name]["frames_used"]
        assert gpu[name]["score"] == pytest.approx(cpu[name]["score"], abs=0.05)
