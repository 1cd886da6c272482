"""What a run is asked to do, the checks that need neither torch nor a model, and the one way a
model is made (scoring, eval, bench and training alike).

Kept free of heavy imports at module level: the command line builds a ``RunConfig`` and calls
``check`` before torch is imported (torch alone takes seconds), so a usage error comes at once.
A model is made in two steps: ``plan_run`` / ``plan_model`` resolve the class, its settled
config and the weights to load without building anything (so discovery can ask the model's
spec what it needs first); ``ModelPlan.build`` constructs it and loads the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from qscore import registry
from qscore.media.discover import check_inputs
from qscore.types import MissingWeights, UsageError

if TYPE_CHECKING:
    import torch

    from qscore.models.base import Model

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
    engine: str = "local"  # local | ray (every GPU of a Ray cluster: qscore.ray_engine)
    ray_address: str | None = None  # None: start a local Ray on this machine


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
    file, --engine ray without Ray, missing PATH or --pairs, unwritable --out (created here). Raises UsageError, or
    ``DiscoveryError`` for the paths."""
    try:
        registry.target(cfg.model)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from e
    if cfg.weights not in (None, "random") and not Path(cfg.weights).is_file():
        raise UsageError(f"--weights {cfg.weights}: no such file (or use 'random')")
    if cfg.engine not in ("local", "ray"):
        raise UsageError(f"--engine must be local or ray, not {cfg.engine!r}")
    if cfg.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("--engine ray needs Ray: pip install 'qscore[ray]'")
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


# ---- making the model ----------------------------------------------------------------------------
BACKBONE = "<backbone>"  # weights: the pretrained parts alone, no trained head (`qscore train --init official`)


@dataclass
class ModelPlan:
    """A model resolved but not built: its class, settled config and the weights to load.
    Cheap (no parameters are made, no weights read)."""

    name: str
    cls: type[Model]
    config: Any
    preset: str
    registry: Any  # qscore.weights.Registry
    weights: str | None  # as Model.load takes it (None: official, "random", a checkpoint file), or BACKBONE
    starter: str | None = None  # the packaged starter's weights.toml key, when ``weights`` is it

    @property
    def needs_reference(self) -> bool:
        return self.cls.spec.needs_reference(self.config)

    def build(self, device: torch.device | str = "cpu", seed: int = 0, maps: bool = True, hint: str = "") -> tuple[Model, str, str]:
        """(the model on ``device`` in eval mode, weights_id, head). ``seed`` seeds torch before
        the parameters are made, so random weights are reproducible; ``maps``: see
        ``Model.draw_maps``; ``hint`` follows a missing-weights message."""
        import torch

        try:
            torch.manual_seed(seed)
            model = self.cls(self.config)
            if self.weights == BACKBONE:
                model.load_backbone(self.registry)
                weights_id, head = BACKBONE, "untrained"
            else:
                weights_id, head = model.load(self.weights, self.registry)
        except MissingWeights as e:
            raise UsageError(f"{e}{hint}") from e
        except OSError as e:
            raise UsageError(f"cannot read {e.filename}: {e.strerror}") from e
        except (ValueError, TypeError) as e:
            raise UsageError(f"{self.name}: {e}") from e
        if self.starter is not None:
            weights_id, head = f"{self.starter}@{weights_id}", "starter"
        return model.draw_maps(maps).to(device).eval(), weights_id, head


def build_model(cfg: RunConfig, device: torch.device | str) -> tuple[Model, str, str]:
    """The model a scoring run (or eval, or bench) uses: ``plan_run(cfg).build(...)``."""
    return plan_run(cfg).build(device, cfg.seed, maps=cfg.maps or cfg.save_npz)


def plan_run(cfg: RunConfig) -> ModelPlan:
    """The model ``cfg`` asks for, with its weights resolved: ``--weights FILE`` or ``random``;
    else a trained head in the ``<model>-head`` slot; else the starter checkpoint shipped in the
    package (``<model>-starter``, head "starter"), unless another ``--preset`` is asked for; else
    the model's official weights. A checkpoint's card names its preset and config; ``--set``
    goes on top. Sets ``cfg.preset`` to the preset used."""
    cls = model_class(cfg.model, cfg.task)
    reg = load_registry(cfg.registry)
    with _registry_errors():  # the starter is checked against its sha256
        starter = reg.starter(cfg.model) if cfg.weights is None else None
    weights, card = cfg.weights, None
    if weights not in (None, "random"):
        if not Path(weights).is_file():
            raise UsageError(f"--weights {weights}: no such file (or use 'random')")
        card = _card(Path(weights), f"--weights {weights}")
    elif starter is not None:
        card = _card(starter[1], starter[0])
        if cfg.preset not in (None, card.get("preset")):
            starter, card = None, None  # another preset asked for: the starter does not fit it
        else:
            weights = str(starter[1])
    elif weights is None:
        card = _head_card(reg, f"{cfg.model}-head")
    overrides = dict(cfg.overrides)
    preset = cfg.preset
    if card is not None:
        preset = preset or card.get("preset")
        overrides = {**card.get("config", {}), **overrides}
    cfg.preset = preset or next(iter(cls.presets))  # a checkpoint's card names its preset
    if "seed" in {f.name for f in dataclasses.fields(cls.Config)}:
        overrides["seed"] = cfg.overrides.get("seed", cfg.seed)  # --seed drives per-file sampling
    return plan_model(cfg.model, cfg.preset, overrides, reg, weights, starter[0] if starter else None)


def plan_model(
    name: str, preset: str | None, overrides: dict[str, Any], reg: Any, weights: str | None, starter: str | None = None
) -> ModelPlan:
    """The model ``name`` with the preset's config, ``overrides`` on top, settled against the
    registry ``reg`` (``Model.settle``); UsageError for a bad option."""
    cls = model_class(name)
    preset = preset or next(iter(cls.presets))
    try:
        config = cls.settle(cls.make_config(preset, **overrides), reg)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{name}: {e}") from e
    return ModelPlan(name, cls, config, preset, reg, weights, starter)


def model_class(name: str, task: str | None = None) -> type[Model]:
    """The class of model ``name``; UsageError when it is unknown, cannot be imported (an optional
    dependency), or is not a ``task`` model."""
    try:
        cls = registry.get(name)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from e
    except ImportError as e:
        raise UsageError(f"model {name!r} cannot be loaded: {e}") from e
    if task is not None and cls.spec.task != task:
        raise UsageError(f"model {name!r} is a {cls.spec.task} model; use `qscore {cls.spec.task}`")
    return cls


def load_registry(path: str | None) -> Any:
    """The weights registry (``weights.toml``) to use; UsageError when it cannot be read."""
    from qscore.weights import Registry

    with _registry_errors():
        return Registry.load(path)


@contextlib.contextmanager
def _registry_errors() -> Iterator[None]:
    try:
        yield
    except MissingWeights as e:
        raise UsageError(str(e)) from e
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read weights registry: {e}") from e


def pick_device(spec: str) -> torch.device:
    """``--device``: auto (CUDA when there is one), cpu, cuda or cuda:N."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise UsageError(f"bad --device {spec!r}: use auto, cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec} asked for, but CUDA is not available on this machine")
    return device


def _head_card(reg: Any, key: str) -> dict | None:
    """The card of the checkpoint in a model's head slot, if the slot holds one with a card (its
    preset and config are the ones the head was trained with)."""
    from qscore.weights import card_path

    try:
        path = reg.path(key) if key in reg.keys() and reg.entry(key).kind != "none" else None
    except MissingWeights:
        return None  # load_official reports it
    return _card(path, key) if path is not None and card_path(path).is_file() else None


def _card(path: Path, what: str) -> dict:
    """The JSON card beside a checkpoint (its preset and config)."""
    from qscore.weights import card_path

    card = card_path(path)
    try:
        return json.loads(card.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{what}: cannot read its card {card}: {e}") from e
