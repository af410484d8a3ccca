"""The data stage: tiles and labels in, checked; masks decoded once; folds; the torch Dataset.

``rle`` (the competition's codec) < ``maskcsv`` (the one CSV scanner) < ``images`` (reading and
strictly decoding image files) < ``masks`` (decoded-once mask cache) < ``dataset`` (Split, SegDataset,
transforms) < ``labels`` (class-id PNGs) < ``layouts`` (folder layouts by name) < ``folds`` < ``check``
(``make check-data``) and ``demo`` (the generated demo data set).
"""

from __future__ import annotations

from pipeline.core.errors import BuildsegError


class DataError(BuildsegError, ValueError):
    """Input data that cannot be used; the message names the file/row and how to fix it."""
