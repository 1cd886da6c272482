"""What a run is asked to do, and the checks that need neither torch nor a model.

Kept free of heavy imports: the command line builds a ``RunConfig`` and calls ``check`` before
it imports the runner (torch alone takes seconds to import), so a usage error is reported at
once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qscore import registry
from qscore.media.discover import check_inputs
from qscore.types import UsageError  # noqa: F401 - the run vocabulary is also taken from here

EXIT_OK, EXIT_FAILED_FILES, EXIT_USAGE = 0, 1, 2


@dataclass
class RunConfig:
    task: str  # image | video | forgery
    model: str
    inputs: list[str]
    out: Path = Path("qscore-out")
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # --set key=value (model Config)
    weights: str | None = None  # None: official; "random"; or a qscore checkpoint file
    registry: str | None = None  # weights.toml to use instead of the default resolution
    device: str = "auto"
    batch_size: int = 8
    workers: int = -1  # -1: one per CPU core, at most 16
    decoder: str = "auto"  # video decoding: auto (the GPU's where it can), cpu or gpu
    exts: tuple[str, ...] | None = None
    pairs: str | None = None  # CIML manifest
    force: bool = False
    seed: int = 0
    max_files: int | None = None
    csv: bool = False
    save_npz: bool = False
    maps: bool = True  # write the artefact PNGs (heatmaps, masks); False: rows only
    quiet: bool = False
    verbose: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal


def parse_sets(sets: list[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` options -> model config overrides (dashes in keys become underscores)."""
    overrides = {}
    for kv in sets or []:
        if "=" not in kv:
            raise UsageError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        overrides[k.strip().replace("-", "_")] = v.strip()
    return overrides


def check(cfg: RunConfig) -> None:
    """The usage errors found without building the model: unknown model, missing --weights
    file, missing PATH or --pairs, unwritable --out (created here). Raises UsageError, or
    ``DiscoveryError`` for the paths."""
    try:
        registry.target(cfg.model)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from e
    if cfg.weights not in (None, "random") and not Path(cfg.weights).is_file():
        raise UsageError(f"--weights {cfg.weights}: no such file (or use 'random')")
    check_inputs(cfg.inputs, cfg.pairs)
    prepare_out(cfg.out)


def prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".qscore-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from e
