"""Performance benchmark of every stage: img/s, FLOPs (analytic and XLA), MFU, memory.

  python -m gae_jax.benchmark --config=<config> [--stage=...] [--steps=N] [--sweep=...]

Modules: __main__ (the CLI), stages (each stage's real compiled program, timed),
flops (analytic FLOP counts), peaks (peak FLOP/s per chip, recommended XLA flags),
data (--data_only: the grain input pipeline). Results and commands: docs/performance.md.
"""
