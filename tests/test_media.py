"""Decoding of every bad-input case at the media layer, and correct pixels for valid files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from qscore.media import image as image_mod, video as video_mod
from qscore.media.image import load_image
from qscore.media.sampling import framediff_indices, uniform_indices
from qscore.media.video import open_video, plan_near
from qscore.types import MediaError
from tests.badmedia import (
    bomb_png,
    exif_rotated_jpeg,
    gradient,
    jpeg_bytes,
    make_audio_only,
    make_bad_media,
    make_video,
    noisy_video,
    png16_rgb,
    png_bytes,
    truncate,
)

CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, make_bad_media(folder)


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def error_of(call) -> str:
    with pytest.raises(MediaError) as info:
        call()
    return str(info.value)


# ---- the whole bad-media folder --------------------------------------------------------------
def test_every_generated_case_gets_its_expected_status(bad):
    folder, expected = bad
    assert len(expected) >= 20
    for name, want in expected.items():
        path = str(folder / name)
        try:
            if name.endswith(".mp4"):
                with open_video(path) as reader:
                    reader.frames(uniform_indices(reader.n_frames, 4))
            else:
                load_image(path)
            got = "ok"
        except MediaError as e:
            got = "error"
            assert str(e) and len(str(e)) < 200, name
        assert got == want, (name, want)


# ---- images: errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, data, words",
    [
        ("empty.jpg", b"", "empty file"),
        ("random.jpg", np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(), "not a recognised"),
        ("notes.png", b"hello, I am a text file\n" * 30, "holds text"),
        ("bomb.png", bomb_png(), "decompression-bomb"),
    ],
)
def test_bad_image_files_raise_clear_errors(tmp_path, name, data, words):
    assert words in error_of(lambda: load_image(write(tmp_path, name, data)))


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.97])
def test_truncated_jpeg_and_png_are_refused(tmp_path, fraction):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name, data in (("t.jpg", jpeg_bytes(noise)), ("t.png", png_bytes(noise))):
        cut = data[: int(len(data) * fraction)]
        assert "truncated" in error_of(lambda: load_image(write(tmp_path, name, cut)))


def test_png_missing_only_its_end_chunk_is_refused(tmp_path):
    data = png_bytes(gradient(16, 16))
    assert "truncated" in error_of(lambda: load_image(write(tmp_path, "noend.png", data[:-12])))


def test_bomb_limit_is_configurable(tmp_path):
    path = write(tmp_path, "ok.png", png_bytes(gradient(20, 30)))
    assert "600 pixels" in error_of(lambda: load_image(path, max_pixels=599))
    assert load_image(path, max_pixels=600)[0].shape == (20, 30, 3)


def test_missing_loop_and_folder_paths(tmp_path):
    gone = tmp_path / "gone.jpg"
    gone.write_bytes(jpeg_bytes(gradient(8, 8)))
    gone.unlink()  # vanished between discovery and decoding
    assert "file not found" in error_of(lambda: load_image(str(gone)))
    loop = tmp_path / "loop.jpg"
    os.symlink("loop.jpg", loop)
    assert error_of(lambda: load_image(str(loop))) == "symlink loop"
    assert "folder" in error_of(lambda: load_image(str(tmp_path)))


def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    path = write(tmp_path, "locked.png", png_bytes(gradient(8, 8)))
    os.chmod(path, 0)
    if os.access(path, os.R_OK):  # running as root: chmod 000 does not stop reads, simulate it

        def denied(p, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", p)

        monkeypatch.setattr(image_mod, "open", denied, raising=False)
    assert error_of(lambda: load_image(path)) == "permission denied"


# ---- images: valid files -------------------------------------------------------------------
def test_valid_images_give_exact_pixels(tmp_path):
    photo = gradient(30, 40)
    pixels, facts = load_image(write(tmp_path, "p.png", png_bytes(photo)))
    assert np.array_equal(pixels, photo) and pixels.dtype == np.uint8
    assert facts == {"width": 40, "height": 30, "decoder": "pillow", "decode_warnings": None}
    one, facts = load_image(write(tmp_path, "one.png", png_bytes(np.full((1, 1, 3), 7, np.uint8))))
    assert one.shape == (1, 1, 3) and one[0, 0, 0] == 7 and facts["width"] == 1
    name = os.fsdecode(b"bad\xff.jpg")  # not UTF-8: a surrogate in the str
    pixels, _ = load_image(write(tmp_path, name, jpeg_bytes(photo)))
    assert pixels.shape == (30, 40, 3) and np.abs(pixels.astype(int) - photo).mean() < 4


def test_exif_orientation_is_applied(tmp_path):
    pixels, facts = load_image(write(tmp_path, "r.jpg", exif_rotated_jpeg(h=20, w=40, orientation=6)))
    assert pixels.shape == (40, 20, 3) and (facts["width"], facts["height"]) == (20, 40)
    assert "orientation 6" in facts["decode_warnings"]
    # orientation 6 = rotate 90 degrees clockwise: the stored left column becomes the top row
    stored = gradient(20, 40)
    assert np.abs(pixels[0, :, 1].astype(int) - stored[::-1, 0, 1]).max() < 12


def test_grey_cmyk_palette_and_alpha_become_rgb(tmp_path):
    photo = gradient(24, 32)
    grey, facts = load_image(write(tmp_path, "g.png", png_bytes(photo[..., 1])))
    assert np.array_equal(grey, np.repeat(photo[..., 1:2], 3, axis=2)) and "greyscale" in facts["decode_warnings"]
    cmyk, facts = load_image(write(tmp_path, "c.jpg", jpeg_bytes(Image.fromarray(photo).convert("CMYK"))))
    assert np.abs(cmyk.astype(int) - photo).mean() < 6 and "CMYK" in facts["decode_warnings"]
    pal, facts = load_image(write(tmp_path, "p.png", png_bytes(Image.fromarray(photo).convert("P"))))
    assert pal.shape == photo.shape and "palette" in facts["decode_warnings"]
    red = np.zeros((4, 4, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, 128  # half-transparent red
    rgba, facts = load_image(write(tmp_path, "a.png", png_bytes(red)))
    assert rgba[0, 0].tolist() == [255, 127, 127] and "composited on white" in facts["decode_warnings"]


def test_16_bit_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], np.uint16)  # 32896 = 128 * 257
    grey, facts = load_image(write(tmp_path, "g16.png", png_bytes(Image.fromarray(values))))
    assert grey[0, :, 0].tolist() == [0, 4, 128, 255] and "16-bit" in facts["decode_warnings"]
    rgb16 = np.stack([values, values[:, ::-1], values], axis=-1)
    rgb, facts = load_image(write(tmp_path, "rgb16.png", png16_rgb(rgb16)))
    assert rgb[0, :, 0].tolist() == [0, 3, 128, 255] and rgb[0, 0, 1] == 255
    assert "16-bit RGB" in facts["decode_warnings"]


def test_max_side_caps_the_pixels_not_the_facts(tmp_path):
    path = write(tmp_path, "big.jpg", jpeg_bytes(gradient(300, 400)))
    pixels, facts = load_image(path, max_side=100)
    assert pixels.shape == (75, 100, 3) and (facts["width"], facts["height"]) == (400, 300)


# ---- video: errors -------------------------------------------------------------------------
def test_bad_video_files_raise_clear_errors(tmp_path):
    text = write(tmp_path, "fake.mp4", b"just some text\n" * 50)
    assert "holds text" in error_of(lambda: open_video(text))
    empty = write(tmp_path, "empty.mp4", b"")
    assert "empty file" in error_of(lambda: open_video(empty))
    audio = make_audio_only(tmp_path / "audio.mp4")
    assert error_of(lambda: open_video(str(audio))) == "no video stream (the file has only audio)"
    cut = truncate(make_video(tmp_path / "cut.mp4", n=60), 0.6)  # the index (moov) is at the end
    assert "cannot open video" in error_of(lambda: open_video(str(cut)))
    assert "file not found" in error_of(lambda: open_video(str(tmp_path / "nothere.mp4")))


def test_mp4_truncated_mid_stream_decodes_what_exists_and_warns(tmp_path):
    cut = truncate(noisy_video(tmp_path / "cut.mp4", n=60, faststart=True), 0.6)
    with open_video(str(cut)) as reader:
        frames = reader.frames(uniform_indices(reader.n_frames, 8))
        facts = reader.facts()
    assert frames.shape == (8, 96, 128, 3) and frames.std() > 20
    assert facts["decoder"] == "pyav" and 20 < facts["n_frames"] < 60
    assert "the file holds" in facts["decode_warnings"]


def test_broken_frames_are_reported_not_silently_duplicated(tmp_path):
    path = noisy_video(tmp_path / "broken.mp4", n=60, faststart=True)
    data = bytearray(path.read_bytes())
    for at in (0.3, 0.5, 0.7):
        start = int(len(data) * at)
        data[start : start + 2000] = bytes(2000)
    path.write_bytes(bytes(data))
    with open_video(str(path)) as reader:
        frames = reader.frames(list(range(reader.n_frames)))
        facts = reader.facts()
    assert frames.shape[0] == 60 and facts["decoder"] == "pyav"
    assert "could not be decoded" in facts["decode_warnings"] or "errors" in facts["decode_warnings"]


def test_frames_touched_are_capped(tmp_path, monkeypatch):
    path = make_video(tmp_path / "v.mp4", n=30, gop=30)
    monkeypatch.setattr(video_mod, "MAX_FRAMES_TOUCHED", 10)
    with open_video(str(path)) as reader:
        assert "touched more than 10" in error_of(lambda: reader.frames([25]))


# ---- video: valid files --------------------------------------------------------------------
def test_sparse_frames_equal_a_full_decode(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=30, size=(48, 64))  # x264 defaults: B-frames, some unreferenced
    with open_video(str(path)) as reader:
        assert reader.decoder == "pyav" and reader.n_frames == 30 and reader.codec == "h264"
        assert (reader.width, reader.height, reader.rotation) == (64, 48, 0)
        assert reader.fps == pytest.approx(30) and reader.duration_s == pytest.approx(1.0, abs=0.05)
        assert not all(reader._index.refs)  # so skipping has something to skip
        idx = [29, 0, 14, 14, 7]
        sparse = reader.frames(idx)  # unwanted non-reference frames skipped
        touched = reader._touched
        reader._touched = 0
        every = reader.frames(list(range(30)))
        assert touched < reader._touched
    assert sparse.shape == (5, 48, 64, 3) and np.array_equal(sparse, every[idx])
    bar = sparse[:, 24, :, :].astype(int).sum(-1).argmax(1)  # the moving white bar: column 2i
    assert bar.tolist() == [58, 0, 28, 28, 14]


def test_frames_near_skips_non_reference_frames(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=60, gop=60)  # x264 defaults: B-frames, some unreferenced
    idx = [0, 8, 17, 25, 34, 42, 51, 58, 59]  # the last ones: served without a second pass
    with open_video(str(path)) as reader:
        near, used = reader.frames_near(idx, near=1)
        touched_near = reader._touched
    assert touched_near <= 60  # one forward pass
    assert all(abs(u - i) <= 1 for u, i in zip(used, idx)) and len(set(used)) == len(idx)
    with open_video(str(path)) as reader:
        assert np.array_equal(near, reader.frames(used))  # the same pixels as an exact decode
        reader._touched = 0
        reader.frames(idx)
        assert touched_near < reader._touched  # fewer frames went through the decoder
        exact, same = reader.frames_near(idx, near=0)
        assert same == idx and np.array_equal(exact, reader.frames(idx))


def test_plan_near_prefers_untaken_then_nearest_then_earlier():
    refs = [True, False, True, False, False, False, True, True]
    assert plan_near([1, 2, 4, 7], refs, 1) == {1: 0, 2: 2, 7: 7}  # 4: no reference within 1
    assert plan_near([1, 3], refs, 1) == {1: 0, 3: 2}
    assert plan_near([2, 3], refs, 1) == {2: 2, 3: 2}  # all taken: the taken one
    assert plan_near([5, 6], refs, 1) == {5: 6, 6: 7}
    assert plan_near([3], refs, 0) == {}


@pytest.mark.parametrize("annexb", [False, True])
def test_reference_flags_match_what_ffmpeg_skips(tmp_path, annexb):
    """The packet index's reference flags (nal_ref_idc) are exactly the frames FFmpeg decodes
    with skip_frame=NONREF, in MP4 (length-prefixed) and MPEG-TS (Annex B start codes)."""
    path = make_video(tmp_path / "v.mp4", n=40, gop=20)
    if annexb:  # the same stream in MPEG-TS, which carries it with start codes
        raw = tmp_path / "v.ts"
        with av.open(str(path)) as src, av.open(str(raw), "w", format="mpegts") as dst:
            out = dst.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(src.streams.video[0]):
                if packet.size:
                    packet.stream = out
                    dst.mux(packet)
        path = raw
    with open_video(str(path)) as reader:
        refs = reader._index.refs
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            s.codec_context.skip_frame = "NONREF"
            kept = sorted(reader._index.position(f.pts, -1) for f in c.decode(s))
    assert refs is not None and 0 < sum(refs) < len(refs) == 40
    assert [i for i, r in enumerate(refs) if r] == kept


def test_mpeg4_reduced_size_and_max_side(tmp_path):
    path = make_video(tmp_path / "m.mp4", n=12, size=(48, 64), codec="mpeg4")
    with open_video(str(path), max_side=32) as reader:
        assert reader.codec == "mpeg4" and reader.frames([0, 11]).shape == (2, 24, 32, 3)
        assert reader.frames([3], size=(20, 30)).shape == (1, 20, 30, 3)
        facts = reader.facts()
    assert facts == {"width": 64, "height": 48, "n_frames": 12, "fps": 30.0, "duration_s": pytest.approx(0.4, abs=0.05),
                     "decoder": "pyav", "decode_warnings": None}


def test_rotation_metadata_is_applied(tmp_path):
    def marked(i: int) -> np.ndarray:
        img = np.zeros((48, 64, 3), np.uint8)
        img[:12, :16] = 255  # top-left block as stored
        return img

    path = make_video(tmp_path / "r.mp4", n=5, rotation=90, frame=marked)
    with open_video(str(path)) as reader:
        assert reader.rotation == 90 and (reader.width, reader.height) == (48, 64)
        frame = reader.frames([2])[0]
    assert frame.shape == (64, 48, 3)
    # 90 degrees counter-clockwise: the stored top-left block ends up bottom-left
    assert frame[-16:, :12].mean() > 200 and frame[:16, :12].mean() < 30


def test_non_utf8_video_name(tmp_path):
    path = make_video(tmp_path / os.fsdecode(b"clip\xfe.mp4"), n=6)
    with open_video(str(path)) as reader:
        assert reader.decoder == "pyav" and reader.frames([5]).shape == (1, 48, 64, 3)


@pytest.mark.parametrize("slack", [0, 1])
def test_framediff_finds_the_cuts(tmp_path, slack):
    cuts = (7, 15, 23, 33)
    levels = np.cumsum([i in cuts for i in range(40)])  # brightness steps at the cuts

    def frame(i: int) -> np.ndarray:
        return np.full((48, 64, 3), 30 + 50 * levels[i], np.uint8)

    path = make_video(tmp_path / "cuts.mp4", n=40, frame=frame)
    with open_video(str(path)) as reader:
        picks = framediff_indices(reader, 4, slack=slack)
    # with slack a probe may land one frame off; the pick is then the first frame after the cut
    assert all(0 <= p - c <= slack for p, c in zip(picks, cuts)), picks


@pytest.mark.skipif(not (CLIPS / "bigbuckbunny.mp4").exists(), reason="shared clips not present")
def test_real_clip():
    with open_video(str(CLIPS / "bigbuckbunny.mp4"), max_side=128) as reader:
        assert reader.decoder == "pyav" and (reader.width, reader.height) == (1280, 720)
        frames = reader.frames(uniform_indices(reader.n_frames, 8))
        picks = framediff_indices(reader, 8, probe=32)
        facts = reader.facts()
    assert frames.shape == (8, 72, 128, 3) and frames.std() > 10
    assert picks == sorted(picks) and 0 <= picks[0] and picks[-1] < facts["n_frames"] == 132
