"""``python -m adaprelora_diffusion.llm``: the ``adaprelora-llm`` command."""

import sys

from .cli import main

sys.exit(main())
