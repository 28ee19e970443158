"""Side-by-side benchmarks of ct_jax and the PyTorch reference (`scripts/bench.py` runs them).

`harness` runs and times the measurements, `sides` wraps each framework's public path,
`report` turns the record into a Markdown table, JSON and a bar chart.
"""
