"""buildseg: a competition pipeline for building extraction (decode RLE -> folds -> train -> submit).

The package is its stages, one sub-package each. Data flows one way: a package imports only from the
packages before it in :data:`STAGES` (``tests/test_layers.py`` checks it, and that the README's map
lists the same packages and modules in the same order).
"""

STAGES: tuple[str, ...] = ("core", "data", "model", "metrics", "geo", "runs", "train", "infer", "report")
