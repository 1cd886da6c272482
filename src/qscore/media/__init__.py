"""Decoding and sampling of images and videos, shared by every model."""


class MediaError(Exception):
    """A file that cannot be decoded or sampled; the message becomes the row's ``error``."""
