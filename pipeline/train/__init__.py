"""Training: the engine (step, loaders, validation), the folds of a run (`make train`), learning curves,
and the out-of-fold tuning that writes the manifest (`make tune`).
"""
