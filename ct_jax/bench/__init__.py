"""Side-by-side benchmarks of ct_jax and the PyTorch reference (`scripts/bench.py` runs them).

`common` (a leaf: configs with their targets, host setup, timing, tokens) is imported by
the rest; `jax_side` and `torch_side` wrap each framework's public path, `peak_memory`
measures a training step's peak memory in a fresh subprocess, `harness` runs and times
everything, `report` turns the record into a Markdown table, JSON and a bar chart.
"""
