"""The weights registry: weights.toml names every file a model needs, where it comes from, its
sha256 and licence. Files are downloaded once into a cache, verified, and loaded without ever
unpickling arbitrary objects. Checkpoints written by ``qscore train`` live here too.

weights.toml holds one table per key::

    [sam-vit-b]
    url = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    sha256 = "ec2df627..."        # of the file; empty when unknown (the first download records it)
    size = 375042383              # bytes, optional, checked after download
    licence = "Apache-2.0"
    used_by = ["rsfiqa"]
    note = "..."

The source is exactly one of ``url = "https://..."``, ``hf = "org/repo:path/in/repo"`` (with an
optional ``revision``), ``open_clip = "arch:tag"`` (the file open_clip's registry points at),
``path = "local/file"`` (relative to the weights.toml that names it), or ``source = "none"`` (a
slot with no file yet). Registries stack: ``--registry FILE``, ``$QSCORE_WEIGHTS``,
``./weights.toml``, then the packaged default; an entry in an earlier file replaces the whole
entry of the same key in a later one.

Cache: ``$QSCORE_HOME`` (default ``$XDG_CACHE_HOME/qscore``, ``~/.cache/qscore``), one folder per
key. Each cached file gets a ``<file>.sha256`` record (``sha256sum -c`` format) so later runs need
not re-hash gigabytes; a file replaced after its record is re-hashed on next use.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import pickle
import re
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from qscore import __version__
from qscore.fsutil import atomic_file  # also qscore.weights.atomic_file, as before
from qscore.types import MissingWeights

log = logging.getLogger(__name__)

PACKAGED = Path(__file__).with_name("weights.toml")
SOURCE_KINDS = ("url", "hf", "open_clip", "path")
FIELDS = {*SOURCE_KINDS, "source", "revision", "sha256", "size", "licence", "used_by", "note"}
CHUNK = 1 << 20
TIMEOUT_S = 60


class BadWeights(MissingWeights):
    """A file was found or downloaded but is not the one weights.toml declares (sha256, size or
    type); nothing wrong is ever kept in the cache."""


@dataclass(frozen=True)
class Entry:
    """One weights.toml table. ``kind`` is url | hf | open_clip | path | none; ``location`` the
    value of that field; ``origin`` the weights.toml that declared it."""

    key: str
    kind: str
    location: str
    sha256: str
    licence: str
    used_by: tuple[str, ...]
    size: int | None = None
    note: str = ""
    revision: str = "main"
    origin: Path | None = None


@dataclass
class Registry:
    """The merged weights.toml entries and the cache they download into."""

    entries: dict[str, Entry]
    home: Path  # the cache folder
    files: tuple[Path, ...] = ()  # the weights.toml files read, highest precedence first

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Registry:
        """Merge ``path``, ``$QSCORE_WEIGHTS``, ``./weights.toml`` and the packaged default."""
        files = []
        for given, what in ((path, "registry file"), (os.environ.get("QSCORE_WEIGHTS"), "$QSCORE_WEIGHTS")):
            if given:
                if not Path(given).is_file():
                    raise FileNotFoundError(f"{what} {given} does not exist")
                files.append(Path(given).resolve())
        if Path("weights.toml").is_file():
            files.append(Path("weights.toml").resolve())
        files.append(PACKAGED.resolve())
        files = list(dict.fromkeys(files))  # the repo's ./weights.toml is the packaged one
        entries: dict[str, Entry] = {}
        for file in reversed(files):
            entries.update(read_registry_file(file))
        return cls(entries, cache_home(), tuple(files))

    # ---- what is declared ---------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.entries)

    def entry(self, key: str) -> Entry:
        if key not in self.entries:
            raise KeyError(f"unknown weights key {key!r}; known: {', '.join(self.entries)}")
        return self.entries[key]

    def cache_path(self, key: str) -> Path:
        """Where the file is or must be placed (a ``path`` entry: that path itself)."""
        entry = self.entry(key)
        if entry.kind == "path":
            return local_path(entry)
        if entry.kind == "none":
            return self.home / key / f"{key}.safetensors"
        name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(source_url(entry)).path)).name
        return self.home / key / (name or key)

    def rows(self) -> list[dict[str, str]]:
        """One row per entry for ``qscore weights list``."""
        return [
            {
                "key": e.key,
                "kind": e.kind,
                "source": describe_source(e),
                "licence": e.licence,
                "used_by": ", ".join(e.used_by),
                "cached": "yes" if self.cache_path(e.key).is_file() else "no",
            }
            for e in self.entries.values()
        ]

    def used_by(self, model: str) -> list[str]:
        """The keys whose ``used_by`` names ``model``: the one record of which weights a model loads."""
        return [e.key for e in self.entries.values() if model in e.used_by]

    def starter(self, model: str) -> tuple[str, Path] | None:
        """``(key, file)`` of the starter checkpoint shipped for ``model`` (``<model>-starter``),
        when no trained head is registered in the ``<model>-head`` slot; None otherwise. The
        file is checked against its sha256 on every use (it is small)."""
        head, key = f"{model}-head", f"{model}-starter"
        if key not in self.entries or head in self.entries and self.entries[head].kind != "none":
            return None
        file = self.path(key)
        entry = self.entries[key]
        got = file_sha256(file) if entry.sha256 else ""
        if got != entry.sha256:
            raise BadWeights(f"{key}: {file} has sha256 {got}, weights.toml expects {entry.sha256}")
        return key, file

    # ---- getting files --------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """The file for ``key``: from the cache, or downloaded (verified, then renamed in) when
        allowed. Raises MissingWeights naming the file and where to place it otherwise."""
        entry, file = self.entry(key), self.cache_path(key)
        if entry.kind == "path":
            if not file.is_file():
                raise MissingWeights(
                    f"{key}: local weights file {file} does not exist (fix `path` in {entry.origin})"
                )
            return file
        error, problem = MissingWeights, "is not in the cache"
        if file.is_file():
            got = recorded_sha256(file)
            if not entry.sha256 or got == entry.sha256:
                return file
            error, problem = BadWeights, f"in the cache has sha256 {got}, but weights.toml expects {entry.sha256}"
        if entry.kind == "none":
            raise MissingWeights(
                f"{key} has no file yet: {entry.note}\n"
                f"  (or place a `qscore train` checkpoint and its .json card at {file})"
            )
        if offline_var():
            raise error(
                f"{key}: {file.name} {problem}, and {offline_var()} forbids downloads.\n"
                f"  Place the file at: {file}\n"
                f"  (`qscore weights path {key}` prints this path.) Source: {source_url(entry)}"
                + (f"\n  Expected sha256: {entry.sha256}" if entry.sha256 else "")
            )
        download(entry, source_url(entry), file)
        return file

    def pull(self, key: str) -> Path:
        """Like ``path``, but a file already cached is re-hashed in full first (a bad one is
        downloaded again, or reported when offline)."""
        file = self.cache_path(key)
        if self.entry(key).kind != "path" and file.is_file():
            write_sidecar(file, file_sha256(file))
        return self.path(key)

    def verify(self, key: str) -> tuple[bool, str]:
        """Re-hash the cached file against weights.toml (or the hash recorded at download)."""
        entry, file = self.entry(key), self.cache_path(key)
        if not file.is_file():
            return False, f"not present; place it at {file}"
        got = file_sha256(file)
        if entry.sha256:
            if got == entry.sha256:
                return True, f"ok (sha256 {got})"
            return False, f"MISMATCH at {file}: sha256 {got}, weights.toml expects {entry.sha256}"
        record = sidecar(file)
        if record.is_file() and read_sidecar(record) != got:
            return False, f"CHANGED at {file}: sha256 {got}, recorded at download {read_sidecar(record)}"
        return True, f"no sha256 in weights.toml; file hashes to {got}"


# ---- weights.toml -------------------------------------------------------------------------------
def read_registry_file(file: Path) -> dict[str, Entry]:
    with open(file, "rb") as f:
        try:
            tables = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{file}: not valid TOML: {e}") from e
    return {key: parse_entry(key, table, file) for key, table in tables.items()}


def parse_entry(key: str, table: Any, origin: Path) -> Entry:
    where = f"{origin}: [{key}]"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):
        raise ValueError(f"{where}: a key is letters, digits, '.', '_' and '-' (it names a cache folder)")
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    unknown = sorted(set(table) - FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    kinds = [k for k in SOURCE_KINDS if k in table]
    if not kinds and table.get("source") == "none":
        kind, location = "none", ""
    elif len(kinds) == 1 and "source" not in table:
        kind, location = kinds[0], table[kinds[0]]
    else:
        raise ValueError(f'{where}: needs exactly one of {", ".join(SOURCE_KINDS)}, or source = "none"')
    sha256 = str(table.get("sha256", "")).lower()
    size = table.get("size")
    used_by = table.get("used_by")
    checks = [
        (isinstance(location, str), f"{kind} must be a string"),
        (kind != "url" or location.startswith(("https://", "http://")), "url must start with https://"),
        (kind != "hf" or re.fullmatch(r"[^/:\s]+/[^/:\s]+:\S+", location) is not None,
         'hf must look like "org/repo:path/in/repo"'),
        (kind != "open_clip" or re.fullmatch(r"[^:\s]+:[^:\s]+", location) is not None,
         'open_clip must look like "arch:tag"'),
        ("revision" not in table or kind == "hf", "revision only applies to hf sources"),
        (re.fullmatch(r"([0-9a-f]{64})?", sha256) is not None, "sha256 must be 64 hex digits or empty"),
        (size is None or isinstance(size, int) and size > 0, "size must be a positive number of bytes"),
        (isinstance(table.get("licence"), str) and table["licence"].strip() != "", "licence is required"),
        (isinstance(used_by, list) and all(isinstance(u, str) for u in used_by),
         'used_by must be a list of model names, e.g. ["qclip"]'),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{where}: {message}")
    return Entry(
        key=key,
        kind=kind,
        location=location,
        sha256=sha256,
        licence=table["licence"],
        used_by=tuple(used_by),
        size=size,
        note=str(table.get("note", "")),
        revision=str(table.get("revision", "main")),
        origin=origin,
    )


def local_path(entry: Entry) -> Path:
    path = Path(os.path.expandvars(entry.location)).expanduser()
    return path if path.is_absolute() or entry.origin is None else entry.origin.parent / path


def source_url(entry: Entry) -> str:
    """The URL a url / hf / open_clip entry downloads from (HF through ``$QSCORE_HF_ENDPOINT`` or
    ``$HF_ENDPOINT`` when set)."""
    if entry.kind == "url":
        return entry.location
    if entry.kind == "hf":
        repo, path = entry.location.split(":", 1)
        revision = entry.revision
    elif entry.kind == "open_clip":
        repo, path, revision = open_clip_file(entry.location)
        if repo is None:
            return path
    else:
        return ""
    endpoint = os.environ.get("QSCORE_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    endpoint = endpoint.rstrip("/")
    return f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"


def open_clip_file(location: str) -> tuple[str | None, str, str]:
    """``(hf repo, file, revision)`` that open_clip loads for ``arch:tag``: its HF hub entry,
    safetensors first as open_clip prefers; or ``(None, url, "")`` for a URL-only tag."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    arch, tag = location.split(":", 1)
    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained weights {tag!r} for {arch!r}")
    if not cfg.get("hf_hub"):
        return None, cfg["url"], ""
    repo, name = cfg["hf_hub"].rstrip("/"), ""
    if repo.count("/") > 1:
        repo, name = repo.rsplit("/", 1)
    if name in ("", HF_WEIGHTS_NAME):
        name = HF_SAFE_WEIGHTS_NAME
    return repo, name, "main"


def describe_source(entry: Entry) -> str:
    if entry.kind == "hf" and entry.revision != "main":
        return f"{entry.location}@{entry.revision}"
    return entry.location or "-"


def cache_home() -> Path:
    if os.environ.get("QSCORE_HOME"):
        return Path(os.environ["QSCORE_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "qscore"


def offline_var() -> str | None:
    """The environment variable that forbids network access, if one is set."""
    for var in ("QSCORE_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


# ---- downloads and hashes ---------------------------------------------------------------------
def download(entry: Entry, url: str, dest: Path) -> None:
    """Stream ``url`` into a temp file beside ``dest`` while hashing, check it, rename it in.
    Whatever fails, the temp file is removed: a proxy's error page never lands in the cache."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s", entry.key, url)
    request = urllib.request.Request(url, headers={"User-Agent": f"qscore/{__version__}"})
    digest, size = hashlib.sha256(), 0
    with atomic_file(dest) as tmp:
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
                if response.headers.get_content_type() == "text/html":
                    raise BadWeights(f"{entry.key}: {url} answered with an HTML page, not a weights file")
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            raise MissingWeights(
                f"{entry.key}: cannot download {url}: {e}\n"
                f"  Place the file at: {dest}  (`qscore weights path {entry.key}` prints it)"
            ) from e
        got = digest.hexdigest()
        if entry.size and size != entry.size:
            raise BadWeights(f"{entry.key}: {url} gave {size} bytes, weights.toml expects {entry.size}; nothing cached")
        if entry.sha256 and got != entry.sha256:
            raise BadWeights(
                f"{entry.key}: {url} gave a file with sha256 {got}, weights.toml expects {entry.sha256} "
                f"(a proxy or error page?); nothing cached"
            )
    write_sidecar(dest, got)
    if not entry.sha256:
        log.warning(
            "%s: weights.toml has no sha256; the downloaded file hashes to %s (recorded in %s). "
            'Check it against the publisher and add sha256 = "%s" to weights.toml.',
            entry.key, got, sidecar(dest), got,
        )


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(file: Path) -> Path:
    return file.with_name(file.name + ".sha256")


def read_sidecar(record: Path) -> str:
    return record.read_text().split(maxsplit=1)[0] if record.stat().st_size else ""


def write_sidecar(file: Path, sha256: str) -> None:
    sidecar(file).write_text(f"{sha256}  {file.name}\n")


def recorded_sha256(file: Path) -> str:
    """The file's sha256 from its record; hashed (and recorded) when there is no record or the
    file changed after it (a file placed by hand is checked once, on first use)."""
    record = sidecar(file)
    if record.is_file() and record.stat().st_mtime_ns >= file.stat().st_ctime_ns:
        return read_sidecar(record)
    got = file_sha256(file)
    write_sidecar(file, got)
    return got


# ---- loading tensors ----------------------------------------------------------------------------
def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint on the CPU: safetensors, or ``torch.load(weights_only=True)``,
    which refuses any pickled object beyond tensors and plain containers. A top-level
    ``model`` / ``state_dict`` / ``module`` wrapper is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        # training scripts of the DeiT / VideoMAE family save their argparse args beside the
        # weights; a Namespace only holds attributes, so it is safe to allow
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to load: it holds pickled objects other than tensors ({e})") from e
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    stray = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if stray:
        raise ValueError(f"{path}: not a state dict; non-tensor entries: {', '.join(map(str, stray[:5]))}")
    return obj


# ---- qscore train checkpoints ---------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], card: dict) -> dict:
    """Write ``path`` (safetensors) and its JSON card beside it, each via a temp file and a
    rename. Fills ``card["weights_id"]`` ("sha256:" + 16 hex of the file) and
    ``card["qscore_version"]``; returns the card."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a qscore checkpoint must end in .safetensors")
    if not card.get("model"):
        raise ValueError("the checkpoint card must name its model (card['model'])")
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors sharing storage (tied weights, views)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))
        weights_id = "sha256:" + file_sha256(tmp)[:16]
    card = {**card, "weights_id": weights_id, "qscore_version": __version__}
    with atomic_file(card_path(path)) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    return card


def load_checkpoint(path: str | os.PathLike, expect_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state, card)`` of a ``qscore train`` checkpoint; checks the card's model and that the
    file still hashes to the card's weights_id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not card_path(path).is_file():
        raise FileNotFoundError(
            f"checkpoint card {card_path(path)} is missing: a qscore checkpoint is a .safetensors "
            f"file with the JSON card `qscore train` wrote beside it"
        )
    card = json.loads(card_path(path).read_text())
    if expect_model is not None and card.get("model") != expect_model:
        raise ValueError(f"{path} is a checkpoint of {card.get('model')!r}, not {expect_model!r}")
    weights_id = "sha256:" + file_sha256(path)[:16]
    if card.get("weights_id") != weights_id:
        raise ValueError(
            f"{path} hashes to {weights_id} but its card says {card.get('weights_id')}: "
            f"the file or its card was changed or mixed up"
        )
    from safetensors.torch import load_file

    return load_file(path, device="cpu"), card


def snippet(key: str, card: dict, path: str | os.PathLike) -> str:
    """The weights.toml table that registers a trained checkpoint (``qscore train`` prints it)."""
    path = Path(path).resolve()
    about = ", ".join(
        f"{name} {card[field]}" for field, name in
        (("preset", "preset"), ("backbone", "backbone"), ("data_hash", "data"), ("weights_id", "weights_id"))
        if card.get(field)
    )
    fields = {
        "path": str(path),
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
        "licence": card.get("licence") or "unspecified (trained by qscore; check the training data's terms)",
        "used_by": [card["model"]],
        "note": f"qscore train {card['model']} ({about}; qscore {card.get('qscore_version', __version__)})",
    }
    header = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
    body = "\n".join(f"{name} = {json.dumps(value, ensure_ascii=False)}" for name, value in fields.items())
    return f"[{header}]\n{body}\n"


def card_path(path: Path) -> Path:
    return path.with_suffix(".json")
