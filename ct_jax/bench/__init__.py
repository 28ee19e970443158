"""Side-by-side benchmarks of ct_jax and the PyTorch reference (`scripts/bench.py` runs them).

`harness` runs and times the measurements, `sides` wraps each framework's public path,
`peak_memory` measures a training step's peak memory in a fresh subprocess,
`report` turns the record into a Markdown table, JSON and a bar chart.
"""
