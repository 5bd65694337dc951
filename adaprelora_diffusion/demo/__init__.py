"""The embedded demo: tiny SD pipelines (random-weight and pretrained on procedural scenes) and
the demo subject, so the README's run command draws something on a CPU with nothing downloaded.

Product code does not import this package, except to pick the default model when none is given.
"""
