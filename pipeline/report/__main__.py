"""``python -m pipeline.report RUN`` (``make report``): every figure of a run (:mod:`.write`)."""

import sys

from pipeline.report.write import main

sys.exit(main())
