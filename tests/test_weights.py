"""The weights registry against a real HTTP server on 127.0.0.1: downloads, sha256 checks, cache,
offline mode, registry stacking, safe loading and the `qscore train` checkpoint round trip."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import logging
import os
import re
import threading
import tomllib
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qscore import registry as model_registry
from qscore.types import MissingWeights
from qscore.weights import (
    PACKAGED,
    BadWeights,
    Entry,
    Registry,
    cache_home,
    load_checkpoint,
    load_state,
    save_checkpoint,
    snippet,
    source_url,
)

PAYLOAD = os.urandom(2_500_000)  # spans several download chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """A static HTTP server: ``routes[path] = (status, content_type, body, headers)``; records
    the path of every request it receives."""

    def __init__(self):
        self.routes: dict[str, tuple[int, str, bytes, dict]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                status, ctype, body, headers = server.routes.get(self.path, (404, "text/plain", b"no", {}))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def serve(self, path: str, body: bytes, ctype: str = "application/octet-stream", status: int = 200, **headers):
        self.routes[path] = (status, ctype, body, headers)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """An empty cache, no registry or network variables, and a working folder without weights.toml."""
    for var in ("QSCORE_OFFLINE", "HF_HUB_OFFLINE", "QSCORE_WEIGHTS", "QSCORE_HF_ENDPOINT", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QSCORE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path / "cache"


def write_registry(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def url_entry(key: str, url: str, sha256: str = "", extra: str = "") -> str:
    return (
        f'[{key}]\nurl = "{url}"\nsha256 = "{sha256}"\nlicence = "Apache-2.0"\n'
        f'used_by = ["rsfiqa"]\n{extra}\n'
    )


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---- downloads ------------------------------------------------------------------------------------
def test_download_verifies_and_second_call_is_a_cache_hit(server, home, tmp_path):
    server.serve("/w/model.pth", PAYLOAD)
    file = write_registry(
        tmp_path / "reg.toml", url_entry("toy", server.url("/w/model.pth"), PAYLOAD_SHA, f"size = {len(PAYLOAD)}")
    )
    reg = Registry.load(file)

    got = reg.path("toy")
    assert got == home / "toy" / "model.pth" == reg.cache_path("toy")
    assert got.read_bytes() == PAYLOAD
    assert server.requests == ["/w/model.pth"]
    assert reg.path("toy") == got
    assert Registry.load(file).path("toy") == got  # a later run: still no request
    assert server.requests == ["/w/model.pth"]
    assert files_under(home) == [got, got.with_name("model.pth.sha256")]  # no temp file left
    assert got.with_name("model.pth.sha256").read_text().split() == [PAYLOAD_SHA, "model.pth"]
    assert reg.verify("toy") == (True, f"ok (sha256 {PAYLOAD_SHA})")
    assert next(r for r in reg.rows() if r["key"] == "toy")["cached"] == "yes"


def test_sha256_mismatch_raises_and_leaves_nothing_in_the_cache(server, home, tmp_path):
    server.serve("/w/model.pth", b"<proxy says hello>" * 100)
    reg = Registry.load(write_registry(tmp_path / "reg.toml", url_entry("toy", server.url("/w/model.pth"), PAYLOAD_SHA)))

    with pytest.raises(BadWeights) as err:
        reg.path("toy")
    got = hashlib.sha256(b"<proxy says hello>" * 100).hexdigest()
    assert PAYLOAD_SHA in str(err.value) and got in str(err.value)
    assert isinstance(err.value, MissingWeights)  # the CLI's exit code 2
    assert files_under(home) == []


def test_size_mismatch_raises_and_leaves_nothing(server, home, tmp_path):
    server.serve("/w/model.pth", PAYLOAD[:1000])
    reg = Registry.load(write_registry(tmp_path / "reg.toml", url_entry("toy", server.url("/w/model.pth"), extra="size = 5")))
    with pytest.raises(BadWeights, match="1000 bytes, weights.toml expects 5"):
        reg.path("toy")
    assert files_under(home) == []


def test_an_html_error_page_is_never_cached_even_without_sha256(server, home, tmp_path):
    server.serve("/w/model.pth", b"<html>proxy error</html>", ctype="text/html")
    reg = Registry.load(write_registry(tmp_path / "reg.toml", url_entry("toy", server.url("/w/model.pth"))))
    with pytest.raises(BadWeights, match="HTML page"):
        reg.path("toy")
    assert files_under(home) == []


def test_http_error_is_missing_weights_naming_where_to_place_the_file(server, home, tmp_path):
    reg = Registry.load(write_registry(tmp_path / "reg.toml", url_entry("toy", server.url("/gone.pth"), PAYLOAD_SHA)))
    with pytest.raises(MissingWeights, match="404") as err:
        reg.path("toy")
    assert str(home / "toy" / "gone.pth") in str(err.value)
    assert files_under(home) == []


def test_without_sha256_the_download_records_its_hash_and_warns(server, home, tmp_path, caplog):
    server.serve("/w/model.pth", PAYLOAD)
    reg = Registry.load(write_registry(tmp_path / "reg.toml", url_entry("toy", server.url("/w/model.pth"))))
    with caplog.at_level(logging.WARNING, logger="qscore.weights"):
        got = reg.path("toy")
    assert PAYLOAD_SHA in caplog.text and "no sha256" in caplog.text
    assert got.with_name("model.pth.sha256").read_text().startswith(PAYLOAD_SHA)
    assert reg.verify("toy")[0]

    got.write_bytes(b"changed on disk")
    ok, message = reg.verify("toy")
    assert not ok and "CHANGED" in message and PAYLOAD_SHA in message


def test_hf_source_resolves_through_the_endpoint_override_and_follows_redirects(server, home, tmp_path, monkeypatch):
    monkeypatch.setenv("QSCORE_HF_ENDPOINT", server.url(""))
    server.serve("/org/repo/resolve/abc123/sub/w.safetensors", b"", status=302, Location="/blobs/w")
    server.serve("/blobs/w", PAYLOAD)
    reg = Registry.load(
        write_registry(
            tmp_path / "reg.toml",
            f'[toy]\nhf = "org/repo:sub/w.safetensors"\nrevision = "abc123"\nsha256 = "{PAYLOAD_SHA}"\n'
            'licence = "MIT"\nused_by = ["qclip"]\n',
        )
    )
    assert reg.path("toy") == home / "toy" / "w.safetensors"
    assert reg.path("toy").read_bytes() == PAYLOAD
    assert server.requests == ["/org/repo/resolve/abc123/sub/w.safetensors", "/blobs/w"]
    row = next(r for r in reg.rows() if r["key"] == "toy")
    assert row == {"key": "toy", "kind": "hf", "source": "org/repo:sub/w.safetensors@abc123", "licence": "MIT",
                   "used_by": "qclip", "cached": "yes"}

    monkeypatch.delenv("QSCORE_HF_ENDPOINT")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert source_url(reg.entry("toy")) == "https://mirror.example/org/repo/resolve/abc123/sub/w.safetensors"


def test_open_clip_source_points_at_the_file_open_clip_loads():
    reg = Registry.load()
    reg.entries["b16"] = Entry(
        key="b16", kind="open_clip", location="ViT-B-16:openai", sha256="", licence="MIT", used_by=("clifvqa",)
    )
    assert source_url(reg.entry("b16")) == source_url(reg.entry("clip-vit-b16-openai")) == (
        "https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_model.safetensors"
    )
    assert reg.cache_path("b16").name == "open_clip_model.safetensors"


# ---- offline --------------------------------------------------------------------------------------
@pytest.mark.parametrize("var", ["QSCORE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_fails_fast_naming_the_path_and_never_connects(server, home, tmp_path, monkeypatch, var):
    server.serve("/w/model.pth", PAYLOAD)
    reg = Registry.load(write_registry(tmp_path / "reg.toml", url_entry("toy", server.url("/w/model.pth"), PAYLOAD_SHA)))
    monkeypatch.setenv(var, "1")

    def no_network(*args, **kwargs):
        raise AssertionError("offline mode opened a connection")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(MissingWeights) as err:
        reg.path("toy")
    message = str(err.value)
    for part in ("toy", "model.pth", str(reg.cache_path("toy")), "qscore weights path toy", var, PAYLOAD_SHA):
        assert part in message
    assert server.requests == []

    # a file placed there by hand is checked once, then used
    reg.cache_path("toy").parent.mkdir(parents=True)
    reg.cache_path("toy").write_bytes(b"wrong file")
    with pytest.raises(BadWeights, match="expects " + PAYLOAD_SHA):
        reg.path("toy")
    reg.cache_path("toy").write_bytes(PAYLOAD)
    os.utime(reg.cache_path("toy").with_name("model.pth.sha256"), ns=(0, 0))  # the record predates the copy
    assert reg.path("toy").read_bytes() == PAYLOAD
    assert server.requests == []


def test_pull_rehashes_a_cached_file_and_replaces_a_bad_one(server, home, tmp_path):
    server.serve("/w/model.pth", PAYLOAD)
    reg = Registry.load(write_registry(tmp_path / "reg.toml", url_entry("toy", server.url("/w/model.pth"), PAYLOAD_SHA)))
    file = reg.pull("toy")
    file.write_bytes(b"bit rot")
    record = file.with_name("model.pth.sha256")
    os.utime(record, ns=(file.stat().st_ctime_ns + 10**9,) * 2)  # the record looks newer: path() trusts it

    assert reg.path("toy") == file and len(server.requests) == 1
    assert not reg.verify("toy")[0]
    assert reg.pull("toy").read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    assert reg.verify("toy")[0]


# ---- other sources --------------------------------------------------------------------------------
def test_path_source_is_relative_to_its_registry_and_missing_is_clear(tmp_path):
    weights = tmp_path / "models" / "local.pth"
    weights.parent.mkdir()
    weights.write_bytes(PAYLOAD)
    text = '[loc]\npath = "models/local.pth"\nlicence = "MIT"\nused_by = ["rsfiqa"]\n'
    text += '[gone]\npath = "/nonexistent/x.pth"\nlicence = "MIT"\nused_by = ["rsfiqa"]\n'
    reg = Registry.load(write_registry(tmp_path / "reg.toml", text))
    assert reg.path("loc") == weights
    with pytest.raises(MissingWeights, match="/nonexistent/x.pth does not exist"):
        reg.path("gone")
    assert reg.verify("gone") == (False, "not present; place it at /nonexistent/x.pth")


def test_a_slot_without_source_explains_how_to_fill_it():
    reg = Registry.load()
    with pytest.raises(MissingWeights, match="qscore train qclip"):
        reg.path("qclip-head")
    with pytest.raises(KeyError, match="unknown weights key 'nope'"):
        reg.path("nope")


# ---- registry files ---------------------------------------------------------------------------------
def test_registry_override_order(tmp_path, monkeypatch):
    def layer(path: Path, tag: str) -> Path:
        text = url_entry("sam-vit-b", f"https://{tag}.example/sam.pth") + url_entry(f"only-{tag}", f"https://{tag}.example/x")
        return write_registry(path, text)

    explicit = layer(tmp_path / "explicit.toml", "explicit")
    env = layer(tmp_path / "env.toml", "env")
    layer(Path("weights.toml"), "local")
    monkeypatch.setenv("QSCORE_WEIGHTS", str(env))

    reg = Registry.load(explicit)
    assert reg.entry("sam-vit-b").location == "https://explicit.example/sam.pth"
    assert reg.entry("sam-vit-b").sha256 == ""  # the whole entry is replaced, not merged
    assert {"only-explicit", "only-env", "only-local", "sam-vit-l", "pe-core-l14-336"} <= set(reg.keys())
    assert reg.files[0] == explicit.resolve() and reg.files[-1] == PACKAGED.resolve()
    assert Registry.load().entry("sam-vit-b").location == "https://env.example/sam.pth"
    monkeypatch.delenv("QSCORE_WEIGHTS")
    assert Registry.load().entry("sam-vit-b").location == "https://local.example/sam.pth"
    Path("weights.toml").unlink()
    assert Registry.load().entry("sam-vit-b").sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"

    with pytest.raises(FileNotFoundError, match="missing.toml"):
        Registry.load(tmp_path / "missing.toml")


def test_cache_home_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("QSCORE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "qscore"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_home() == Path.home() / ".cache" / "qscore"


@pytest.mark.parametrize(
    "table, complaint",
    [
        ('url = "https://a/b"\nhf = "o/r:f"', "exactly one of"),
        ('source = "nowhere"', "exactly one of"),
        ('url = "https://a/b"\nsha265 = ""', "unknown field"),
        ('url = "https://a/b"\nsha256 = "abc"', "64 hex"),
        ('url = "ftp://a/b"', "https://"),
        ('hf = "just-a-repo"', "org/repo:path"),
        ('open_clip = "ViT-B-16"', "arch:tag"),
        ('url = "https://a/b"\nrevision = "v1"', "revision only"),
        ('url = "https://a/b"\nsize = -3', "size"),
    ],
)
def test_bad_entries_are_rejected_with_the_reason(tmp_path, table, complaint):
    text = f'[bad-key]\n{table}\nlicence = "MIT"\nused_by = ["qclip"]\n'
    with pytest.raises(ValueError, match=re.escape(complaint)) as err:
        Registry.load(write_registry(tmp_path / "reg.toml", text))
    assert "[bad-key]" in str(err.value)
    with pytest.raises(ValueError, match="cache folder"):
        Registry.load(write_registry(tmp_path / "reg.toml", '["../escape"]\nsource = "none"\nlicence = "MIT"\nused_by = []\n'))


@pytest.mark.parametrize("fields", ['used_by = ["qclip"]', 'licence = "MIT"\nused_by = "qclip"'])
def test_licence_and_used_by_are_required(tmp_path, fields):
    with pytest.raises(ValueError, match="licence|used_by"):
        Registry.load(write_registry(tmp_path / "reg.toml", f'[k]\nurl = "https://a/b"\n{fields}\n'))


def test_every_packaged_entry_parses_and_names_licence_and_users():
    assert PACKAGED.resolve() == (Path(__file__).parents[1] / "weights.toml").resolve()
    reg = Registry.load()
    expected = {
        "pe-core-l14-336", "clip-vit-b16-openai", "sam-vit-b", "sam-vit-l", "sam-vit-h",
        "videomamba-t16-k400", "videomamba-m16-k400",
        "qclip-head", "mvqa-head", "clifvqa-head", "rsfiqa-head", "ugdiml-head",
        "rsfiqa-starter", "ugdiml-starter", "clifvqa-starter",
    }
    assert set(reg.keys()) == expected
    models = set(model_registry.names())
    for key in reg.keys():
        e = reg.entry(key)
        assert e.licence and e.used_by and set(e.used_by) <= models, key
        assert e.note, key  # where it comes from, or why sha256 is empty
        if e.kind in ("url", "hf"):
            assert source_url(e).startswith("https://"), key
        if e.kind == "none":
            assert f"qscore train {e.used_by[0]}" in e.note
    assert all(reg.entry(k).sha256 for k in ("sam-vit-b", "sam-vit-l", "sam-vit-h", "videomamba-m16-k400"))
    assert all(reg.entry(k).sha256 for k in expected if k.endswith("-starter"))


# ---- loading ------------------------------------------------------------------------------------------
PICKLE_RAN = []


def _side_effect():
    PICKLE_RAN.append(True)
    return "pwned"


class Sneaky:
    def __reduce__(self):
        return _side_effect, ()


def test_load_state_refuses_a_pickle_with_an_arbitrary_object(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": Sneaky()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_state(path)
    assert PICKLE_RAN == []


def test_load_state_reads_safetensors_and_unwraps_torch_checkpoints(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(3)}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1), "epoch": 7}, tmp_path / "train.pth")
    torch.save({"state_dict": sd}, tmp_path / "lightning.ckpt")
    torch.save({"module": sd, "ds_version": "0.9"}, tmp_path / "deepspeed.pt")
    torch.save(sd, tmp_path / "plain.bin")
    for name in ("w.safetensors", "train.pth", "lightning.ckpt", "deepspeed.pt", "plain.bin"):
        got = load_state(tmp_path / name)
        assert got.keys() == sd.keys(), name
        assert all(torch.equal(got[k], sd[k]) for k in sd), name

    torch.save({"weight": torch.ones(1), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="non-tensor entries: epoch"):
        load_state(tmp_path / "mixed.pth")


# ---- qscore train checkpoints ---------------------------------------------------------------------------
def toy_state() -> dict[str, torch.Tensor]:
    weight = torch.randn(4, 3)
    return {"head.weight": weight, "head.tied": weight, "head.bias": torch.zeros(4), "step": torch.tensor(5)}


def test_checkpoint_round_trip_through_a_user_registry(tmp_path, monkeypatch):
    state = toy_state()
    path = tmp_path / "run" / "best.safetensors"
    card = save_checkpoint(path, state, {"model": "mvqa", "preset": "test", "backbone": "random", "data_hash": "d1"})

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["weights_id"] == "sha256:" + digest[:16]
    assert card["qscore_version"]
    assert json.loads(path.with_suffix(".json").read_text()) == card
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.json", "best.safetensors"]

    text = snippet("mvqa-head", card, path)
    table = tomllib.loads(text)["mvqa-head"]
    assert table["sha256"] == digest and table["used_by"] == ["mvqa"] and table["size"] == path.stat().st_size
    assert card["weights_id"] in table["note"]

    user = write_registry(tmp_path / "elsewhere" / "weights.toml", text)
    monkeypatch.setenv("QSCORE_WEIGHTS", str(user))
    reg = Registry.load()
    assert reg.entry("mvqa-head").kind == "path"
    assert reg.verify("mvqa-head")[0]
    loaded, loaded_card = load_checkpoint(reg.path("mvqa-head"), expect_model="mvqa")
    assert loaded_card == card
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_snippet_quotes_keys_and_values_toml_needs_quoted(tmp_path):
    path = tmp_path / 'odd "dir" é' / "h.safetensors"
    card = save_checkpoint(path, toy_state(), {"model": "qclip"})
    user = write_registry(tmp_path / "reg.toml", snippet("qclip-head.v2", card, path))
    assert tomllib.loads(user.read_text())["qclip-head.v2"]["path"] == str(path.resolve())
    assert Registry.load(user).path("qclip-head.v2") == path.resolve()


def test_load_checkpoint_refuses_the_wrong_model_a_changed_file_or_a_missing_card(tmp_path):
    path = tmp_path / "h.safetensors"
    save_checkpoint(path, toy_state(), {"model": "qclip"})
    with pytest.raises(ValueError, match="'qclip', not 'mvqa'"):
        load_checkpoint(path, expect_model="mvqa")

    save_file({"head.weight": torch.ones(1)}, path)  # replaced behind the card's back
    with pytest.raises(ValueError, match="hashes to sha256:"):
        load_checkpoint(path, expect_model="qclip")

    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="card"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="must name its model"):
        save_checkpoint(tmp_path / "x.safetensors", toy_state(), {})
