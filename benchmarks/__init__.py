"""Speed and quality benchmarks (scripts that print tables) and their harness; not shipped.

Run a script from the repository root (``python benchmarks/optimizer_step.py``); the tests
import ``benchmarks.quality`` as a package. Nothing in ``adaprelora_diffusion`` imports this.
"""
