"""`python -m shared` is `python -m shared.cli`."""

import sys

from .cli import main

sys.exit(main())
