"""Model name -> class. Imports are lazy so one model's optional dependency never breaks another."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing a model (and torch) waits until one is asked for
    from qscore.models.base import Model

MODELS: dict[str, str] = {
    "rsfiqa": "qscore.models.rsfiqa:RSFIQA",
    "qclip": "qscore.models.qclip:QCLIP",
    "mvqa": "qscore.models.mvqa:MVQA",
    "clifvqa": "qscore.models.clifvqa:CLiFVQA",
    "ugdiml": "qscore.models.ugdiml:UGDIML",
}


def names() -> list[str]:
    return list(MODELS) + [n for n in _extra() if n not in MODELS]


def _extra() -> dict[str, str]:
    """Extra models from ``QSCORE_EXTRA_MODELS="name=module:Class,..."`` (tests, plug-ins)."""
    spec = os.environ.get("QSCORE_EXTRA_MODELS", "")
    return dict(part.split("=", 1) for part in spec.split(",") if "=" in part)


def target(name: str) -> str:
    """``module:Class`` of a model; KeyError naming the known ones for an unknown name."""
    found = {**MODELS, **_extra()}.get(name)
    if found is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}")
    return found


def get(name: str) -> type[Model]:
    module, cls = target(name).split(":")
    return getattr(importlib.import_module(module), cls)
