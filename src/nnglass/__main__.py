"""`python -m nnglass` is the `nnglass` command."""

import sys

from .cli import main

sys.exit(main())
