"""`python -m t2i_eval` (also what `accelerate launch -m t2i_eval` runs)."""

import sys

from .cli import main

sys.exit(main())
