"""qscore: batch media quality and image integrity assessment."""

__version__ = "0.1.0"
