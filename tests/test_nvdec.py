"""The GPU decoder's logic on the CPU: PyNvVideoCodec replaced by a stand-in that decodes with
PyAV and hands out NV12 surfaces as NVDEC does, so positions, colour conversion, the per-file
CPU fallback and the runner's --decoder run here; tests/test_nvdec_gpu.py decodes on NVDEC."""

from __future__ import annotations

import sys
import types

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qscore import runner
from qscore.media import nvdec, video
from qscore.media.sampling import uniform_indices
from qscore.runner import RunConfig, run
from tests.badmedia import make_video


class FakeFrame:
    """A decoded NVDEC surface: DLPack export and its pts."""

    def __init__(self, surface: np.ndarray, pts: int):
        self.surface, self.pts = torch.from_numpy(surface), pts

    def getPTS(self) -> int:
        return self.pts

    def __dlpack__(self, **kwargs):
        return self.surface.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.surface.__dlpack_device__()


class FakeDecoder:
    """PyNvVideoCodec.SimpleDecoder's calls the reader makes; ``fail`` (a name part) raises."""

    fail: str | None = None
    pts_shift = 0

    def __init__(self, path: str, gpu_id: int = 0, use_device_memory: bool = True, output_color_type: int = 0):
        self.reconfigure_decoder(path)

    def reconfigure_decoder(self, path: str) -> None:
        self.path = path
        with av.open(path) as c:
            frames = [(f.pts, f.reformat(format="nv12").to_ndarray()) for f in c.decode(c.streams.video[0])]
        self.frames = sorted(frames, key=lambda f: f[0])

    def __len__(self) -> int:
        return len(self.frames)

    def get_batch_frames_by_index(self, indices: list[int]) -> list[FakeFrame]:
        if self.fail and self.fail in self.path:
            raise RuntimeError("simulated NVDEC failure")
        return [FakeFrame(self.frames[i][1], self.frames[i][0] + self.pts_shift) for i in indices]


@pytest.fixture
def fake_nvdec(monkeypatch):
    module = types.SimpleNamespace(SimpleDecoder=FakeDecoder, OutputColorType=types.SimpleNamespace(NATIVE=0))
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", module)
    monkeypatch.setattr(nvdec, "_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(nvdec, "_DECODERS", {})
    monkeypatch.setattr(FakeDecoder, "fail", None)
    monkeypatch.setattr(FakeDecoder, "pts_shift", 0)
    return FakeDecoder


def test_nv12_conversion_matches_swscale(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=3, size=(64, 96))
    with av.open(str(path)) as c:
        frame = next(c.decode(c.streams.video[0]))
    want = frame.to_ndarray(format="rgb24").astype(int)
    nv12 = torch.from_numpy(frame.reformat(format="nv12").to_ndarray())
    got = nvdec.nv12_to_rgb(nv12[:64], nv12[64:]).round().permute(1, 2, 0).numpy()
    diff = np.abs(got - want)
    assert diff.mean() < 1.5 and diff.max() <= 3  # swscale's integer tables round differently


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
    assert np.abs(exact_gpu.numpy().astype(int) - exact_cpu).mean() < 1.5
    assert np.abs(near_gpu.numpy().astype(int) - near_cpu).mean() < 3  # resized after vs while converting
    assert facts["decoder"] == "nvdec" and facts["decode_warnings"] is None


def test_a_failing_file_falls_back_to_the_cpu_and_says_so(tmp_path, fake_nvdec):
    path = str(make_video(tmp_path / "bad.mp4", n=30))
    fake_nvdec.fail = "bad"
    with video.VideoReader(path) as cpu, nvdec.NvdecReader(path) as gpu:
        frames, used = gpu.frames_near([0, 10, 20], near=1)
        want, want_used = cpu.frames_near([0, 10, 20], near=1)
        facts = gpu.facts()
    assert used == want_used and np.array_equal(frames.numpy(), want)  # the CPU's frames, as tensors
    assert facts["decoder"] == "pyav" and "GPU decoder failed" in facts["decode_warnings"]


def test_a_timestamp_mismatch_is_never_served(tmp_path, fake_nvdec):
    path = str(make_video(tmp_path / "v.mp4", n=30))
    fake_nvdec.pts_shift = 1  # the decoder's frames would be off by some
    with nvdec.NvdecReader(path) as gpu:
        gpu.frames([3, 4])
        facts = gpu.facts()
    assert facts["decoder"] == "pyav" and "pts" in facts["decode_warnings"]


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


def test_pick_decoder():
    assert video.pick_decoder("auto", "cpu") == "cpu" and video.pick_decoder("cpu", "cuda") == "cpu"
    with pytest.raises(video.UsageError, match="needs a CUDA device"):
        video.pick_decoder("gpu", "cpu")
    with pytest.raises(video.UsageError, match="auto, cpu or gpu"):
        video.pick_decoder("fast", "cpu")


def test_run_with_the_gpu_decoder_writes_which_decoder_served_each_file(tmp_path, fake_nvdec, monkeypatch):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a.mp4", "bad.mp4", "c.mp4"):
        make_video(clips / name, n=40, gop=20)
    fake_nvdec.fail = "bad"
    monkeypatch.setattr(runner, "pick_decoder", lambda choice, device_type: "gpu")

    def score(out, decoder):
        cfg = RunConfig(task="video", model="qclip", inputs=[str(clips)], out=out, preset="tiny", weights="random",
                        device="cpu", workers=0, batch_size=2, decoder=decoder, quiet=True)
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
