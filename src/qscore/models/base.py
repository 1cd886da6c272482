"""The one interface every method implements; the runner drives it.

A model never walks folders, writes files or shows progress. It does four things (and, where
it has device-side work worth keeping between runs, ``precompute`` and ``cache``):

- ``preparer()``: a picklable callable ``Item -> Sample`` that runs in DataLoader workers on the
  CPU (decode, sample frames, crops). Any randomness is seeded from ``item.seed(run_seed)`` so
  the same file always gives the same sample.
- ``collate(samples) -> batch``: a dict of tensors (default: stack every input along dim 0).
- ``forward(batch) -> outputs``: a dict of tensors whose dim 0 is the file index in the batch.
  The runner moves the batch to the device and wraps the call in autocast.
- ``postprocess(outputs, samples) -> [Output]``: one Output per sample, with the row's columns
  (at least ``score``) and artefact images (heatmap/mask/uncertainty as uint8 arrays).

Weights: ``load(weights, registry)`` sets up parameters and returns the ``weights_id`` and the
``head`` state written in every row ("trained", "zero-shot" or "random").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import pyarrow as pa
import torch
from torch import nn

from qscore.types import Item, MissingWeights, Output, Sample

if TYPE_CHECKING:
    import numpy as np

    from qscore.cache import ArrayCache


@dataclass(frozen=True)
class ModelSpec:
    """What `qscore models` lists and what the runner needs to know about a method."""

    name: str  # CLI name, e.g. "qclip"
    task: str  # "image" | "video" | "forgery"
    summary: str  # one line for `qscore models`
    paper: str  # arXiv id or citation
    licence: str  # licence of the official weights / code it builds on
    lower_better: bool = False
    score_range: str = "[0, 1]"  # documented direction and range (USERS.md #8)
    columns: dict[str, pa.DataType] = field(default_factory=dict)  # extra per-model columns
    artefacts: tuple[str, ...] = ()  # subset of ("heatmap", "mask", "uncertainty", "probability")
    reference_modes: tuple[str, ...] = ()  # Config.mode values where each file has an authentic reference

    def needs_reference(self, config: Any) -> bool:
        """Whether discovery must pair each file with its reference (CIML) under ``config``."""
        return getattr(config, "mode", None) in self.reference_modes


class Model(nn.Module):
    """Base class of the five methods. Subclasses set ``spec`` and ``Config`` (a dataclass);
    their ``presets`` (name -> Config values; the first is the default) are data, read from
    ``presets/<spec.name>.json`` beside the models unless the class sets them itself."""

    spec: ClassVar[ModelSpec]
    Config: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]]
    maps: bool = True  # see draw_maps

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__ and "presets" not in cls.__dict__:
            cls.presets = read_presets(cls.spec.name)

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def draw_maps(self, enabled: bool) -> Model:
        """Whether ``postprocess`` builds heatmaps and other maps (and the preparer keeps what they
        need): off for ``--no-maps`` without ``--npz``. Scores do not change, so it is no part
        of the config (nor of its hash)."""
        self.maps = enabled
        return self

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def make_config(cls, preset: str | None = None, **overrides: Any) -> Any:
        """The preset's Config with ``overrides`` applied (unknown keys are an error)."""
        preset = preset or next(iter(cls.presets))
        if preset not in cls.presets:
            raise ValueError(
                f"unknown preset {preset!r} for {cls.spec.name}; choose from {', '.join(cls.presets)}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown option(s) for {cls.spec.name}: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(fields))}"
            )
        values = {**cls.presets[preset], **overrides}
        return cls.Config(**{k: coerce(v, fields[k].type, fields[k].default) for k, v in values.items()})

    @classmethod
    def settle(cls, config: Any, registry: Any) -> Any:
        """The config with the choices that depend on what is installed made (RSFIQA's
        ``regions=auto``), before the model is built; the settled config is what the config
        hash and a checkpoint's card record. Default: nothing to settle."""
        return config

    def config_hash(self) -> str:
        """Hash of everything that changes a score; part of the resume key."""
        blob = json.dumps(
            {"model": self.spec.name, "config": dataclasses.asdict(self.config)}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ---- weights --------------------------------------------------------------------------
    def load(self, weights: str | None, registry: Any) -> tuple[str, str]:
        """Set parameters from ``weights`` and return ``(weights_id, head)``.

        ``"random"``: keep the random initialisation (rows say so). A path to a ``.safetensors``
        file: a checkpoint written by ``qscore train`` (JSON card beside it). ``None``: the
        official weights from the registry (``load_official``).
        """
        if weights == "random":
            return "random", "random"
        if weights is None:
            return self.load_official(registry)
        from qscore.weights import load_checkpoint

        state, card = load_checkpoint(weights, expect_model=self.spec.name)
        self.load_trained(state, card, registry)
        return card["weights_id"], "trained"

    @property
    def head_key(self) -> str:
        """The weights.toml slot of this model's trained head (``qscore train`` fills it)."""
        return f"{self.spec.name}-head"

    def load_official(self, registry: Any) -> tuple[str, str]:
        """The checkpoint in the ``head_key`` slot (none of the papers released weights, so it is
        one trained with ``qscore train``) when the slot holds a file, else ``load_headless``."""
        path = self.head_file(registry)
        return self.load_headless(registry) if path is None else self.load_head(path, registry)

    def head_file(self, registry: Any) -> Path | None:
        """The file in the ``head_key`` slot; None where weights.toml has no such slot or it holds
        no file yet (kind "none"). A declared file that cannot be had raises MissingWeights: a
        registered head never silently falls back."""
        try:
            return registry.path(self.head_key)
        except (KeyError, MissingWeights):
            if _holds_file(registry, self.head_key):
                raise
            return None

    def load_head(self, path: Path, registry: Any) -> tuple[str, str]:
        """A ``qscore train`` checkpoint (JSON card beside it) from the head slot."""
        from qscore.weights import load_checkpoint

        state, card = load_checkpoint(path, expect_model=self.spec.name)
        self.load_trained(state, card, registry)
        return card["weights_id"], "trained"

    def load_headless(self, registry: Any) -> tuple[str, str]:
        """The official weights when no head is registered. Default: there are none (Q-CLIP and
        CLiF-VQA run zero-shot instead, RSFIQA with a random head)."""
        try:
            slot = registry.entry(self.head_key).note
        except KeyError:
            slot = "weights.toml has no such slot"
        raise MissingWeights(
            f"{self.spec.name} has no trained weights registered as '{self.head_key}': train them with "
            f"`qscore train {self.spec.name}`, then register the printed snippet or pass --weights FILE; "
            f"--weights random only for smoke tests. {' '.join(slot.split())}"
        )

    def load_backbone(self, registry: Any) -> None:
        """The pretrained parts (backbones) from weights.toml and no trained head: where
        ``qscore train --init official`` starts, and what a head-only checkpoint sits on."""
        raise MissingWeights(f"{self.spec.name} has no pretrained backbone to start from")

    def load_trained(self, state: dict[str, torch.Tensor], card: dict, registry: Any) -> None:
        """Load a ``qscore train`` checkpoint. By default: the frozen parts from the official
        backbone when the card says it was used, then the saved tensors on top (strict on them)."""
        if card.get("backbone") == "official":
            self.load_backbone(registry)
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            raise ValueError(f"checkpoint has tensors this model does not: {unknown[:5]}")
        self.load_state_dict(state, strict=False)

    # ---- the four steps -----------------------------------------------------------------
    def preparer(self, train: bool = False) -> Callable[[Item], Sample]:
        """Picklable ``Item -> Sample`` for DataLoader workers; ``train=True`` may augment
        (random crops) and must then add what ``training_loss`` needs (e.g. the mask)."""
        raise NotImplementedError

    def cache(self) -> ArrayCache | None:
        """Where ``precompute``'s results are kept between runs (the preparer reads them back);
        None: the model keeps nothing."""
        return None

    def precompute(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
        """The device-side work worth keeping (RSFIQA: regions of the images its cache lacked),
        before ``forward``: fills it into ``batch`` and returns it by cache key; the runner and
        the training loop save it in ``cache()``. ``forward`` must call it too (a no-op once
        done), so a bare forward works alike. Default: nothing."""
        return {}

    def collate(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        keys = samples[0].inputs.keys()
        return {k: torch.stack([s.inputs[k] for s in samples]) for k in keys}

    def postprocess(self, outputs: dict[str, torch.Tensor], samples: Sequence[Sample]) -> list[Output]:
        return [Output({"score": float(outputs["score"][i])}) for i in range(len(samples))]

    # ---- training -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters ``qscore train`` optimises (frozen backbones excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def training_loss(self, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """One training step's loss; quality models: PLCC + 0.3 x rank on the scores (fp32)."""
        from qscore.train.losses import plcc_rank_loss

        return plcc_rank_loss(self(batch)["score"].float(), targets.float())


def _holds_file(registry: Any, key: str) -> bool:
    """Whether weights.toml declares ``key`` with a file (not kind "none")."""
    try:
        return registry.entry(key).kind != "none"
    except KeyError:
        return False


def read_presets(name: str) -> dict[str, dict[str, Any]]:
    """``presets/<name>.json``: preset name -> Config values, in order (the first is the default).
    A preset's ``about`` says what it is for and is no Config value."""
    path = Path(__file__).with_name("presets") / f"{name}.json"
    presets = json.loads(path.read_text())
    return {preset: {k: v for k, v in values.items() if k != "about"} for preset, values in presets.items()}


def coerce(value: Any, annotation: Any, default: Any) -> Any:
    """Turn a CLI string (``--set key=value``) into the field's type, judged by its default; a
    JSON list (presets, checkpoint cards) becomes the tuple a tuple field holds."""
    if isinstance(value, list) and isinstance(default, tuple):
        return tuple(value)
    if not isinstance(value, str) or isinstance(default, str) or default is None and "str" in str(annotation):
        return value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple):
        parts = [p for p in value.replace("x", ",").split(",") if p]
        kind = type(default[0]) if default else str
        return tuple(kind(p) for p in parts)
    return value
