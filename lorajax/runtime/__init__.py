"""What the process and XLA give a run: compiler options, resident memory.

  attention_pattern.plan      softmax attention chains in a user's jaxpr
  compiler.compiler_options   XLA options for a train step, per backend
  cpu_attention.attention     fused softmax attention on the CPU (XLA FFI,
                              forward and backward; ops and decoders use it)
  dead_rows.prune             a traced function without the rows its
                              slices throw away (a [CLS] readout)
  elementwise_remat.plan      activations that keep only their input
  host_memory.relaunch        re-execute a CPU command with lorajax's block
                              cache preloaded (a step's buffers stay mapped)
  jaxpr_view.Flat             a jaxpr's equations with its calls inlined
  memory.peak_rss_bytes       this process's peak resident memory (VmHWM)
  native.build                a C/C++ source built once into a shared library
  recompute.after_cotangent   jax.checkpoint whose recomputation waits for
                              the block's cotangent (the LoRA rewrite's remat)
  rng.unroll_threefry         jax.random's hash without a loop on CPU (same bits)
"""
