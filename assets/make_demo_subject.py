"""Rewrite the shipped demo subject images: python assets/make_demo_subject.py [--out DIR].

The drawing lives in the package (adaprelora_diffusion/demo_subject.py) so the benchmarks can draw
held-out views of the same subject; this script only writes the five shipped views.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaprelora_diffusion.demo_subject import main  # noqa: E402

if __name__ == "__main__":
    main()
