"""The file layer: safetensors headers and bytes, checkpoints, atomic output, checked JSON and numbers.

Nothing here knows an adapter format; everything above (adapters, formats, ops) reads and writes
files through it.
"""
