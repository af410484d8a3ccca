"""Inference from a run: the fold x TTA ensemble, `make submit`, `validate`, `score`, `predict`
(class-id PNGs), `predict-scene`, `footprints` and `pseudo`.
"""
