"""What the process and XLA give a run: compiler options, resident memory.

  compiler.compiler_options   XLA options for a train step, per backend
  memory.peak_rss_bytes       this process's peak resident memory (VmHWM)
  rng.unroll_threefry         jax.random's hash without a loop on CPU (same bits)
"""
