"""Decoding and sampling of images and videos, shared by every model."""

from qscore.types import MediaError  # noqa: F401  (qscore.media.MediaError, as before)
