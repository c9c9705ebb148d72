import os
import sys

import mftk  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)

sys.path.insert(0, os.path.dirname(__file__))
