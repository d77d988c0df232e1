"""What the process and XLA give a run: compiler options, resident memory.

  compiler.compiler_options   XLA options for a train step, per backend
  cpu_attention.attention     fused softmax attention on the CPU (XLA FFI,
                              forward and backward; ops and decoders use it)
  host_memory.relaunch        re-execute a CPU command with lorajax's block
                              cache preloaded (a step's buffers stay mapped)
  memory.peak_rss_bytes       this process's peak resident memory (VmHWM)
  native.build                a C/C++ source built once into a shared library
  recompute.after_cotangent   jax.checkpoint whose recomputation waits for
                              the block's cotangent (the LoRA rewrite's remat)
  rng.unroll_threefry         jax.random's hash without a loop on CPU (same bits)
"""
