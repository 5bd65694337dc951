"""``python -m app``: see app/cli.py."""

import sys

from .cli import main

sys.exit(main())
