"""``python -m pipeline.train`` (``make train``): the folds of a run, then tuning (:mod:`.trainer`)."""

import sys

from pipeline.train.trainer import main

sys.exit(main())
