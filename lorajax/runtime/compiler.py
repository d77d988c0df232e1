"""XLA compiler options for a lorajax train step, per backend.

Pass them to ``jax.jit(step, compiler_options=lorajax.compiler_options())``
(or ``.lower(...).compile(compiler_options=...)``). For a float32 step they
change how XLA schedules and fuses the step, never what it computes: losses
are identical (for bfloat16, see below).

On CPU (jaxlib 0.10.2), measured on a MiniLM LoRA step (rank 8 on query and
value, batch 32 × 128, float32, AdamW, 2 cores):

- ``xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``: orders the
  program to keep fewer buffers alive; the default, concurrency-optimized
  order hoists backward work into the forward pass.
- ``xla_cpu_experimental_ynn_fusion_type=`` (none): YNNPACK fusions
  materialize broadcast constants at full activation size (e.g. 24 MiB
  ``[32, 128, 1536]`` arrays kept for the whole step) and extend live
  ranges; without them dots run through XLA's own (Eigen) runtime.

Together: XLA temporaries 927 MB → 545 MB and step time 1096 → 903 ms.

The training loop uses them by default (``config.xla_options``). At the
shipped configs' 48 tokens the gain is memory, not speed (2026-11-22,
``lorajax.cli.profile --steps 20``, two alternating runs each): LoRA at batch
32 peaks at 1,024–1,043 MB with them and 1,096–1,108 MB without, at the same
step time (346–384 ms either way); full fine-tuning is mixed on memory and
at batch 8 about 20% slower with them (208–215 vs 172–175 ms), so a
full fine-tuning config may set ``xla_options = False``.

A bfloat16 step (``compiler_options(dtype='bfloat16')``, which the training
loop passes when ``config.model.dtype`` is ``'bfloat16'``) adds two:

- ``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``:
  each product alone goes to YNNPACK, which multiplies bfloat16 operands on
  the CPU's bfloat16 units (AMX here) when the product is asked for in
  float32: the form of ``lorajax.matmul``, which ``lorajax.lora`` gives every
  bfloat16 product on the CPU. XLA's own runtime multiplies bfloat16 in
  float32 (a 2048² product: 186 GFLOP/s, against 821 this way).
- ``xla_allow_excess_precision=False``: XLA keeps the program's casts to
  bfloat16. With excess precision allowed it drops a cast where a float32
  value feeds a product (SmolLM2's final norm before its LM head) and runs
  that product in float32.

Measured interleaved in one process (2026-12-01, 2-core Xeon with AMX,
LoRA q/v, rank 8, AdamW): MiniLM 32 × 128 1,561 → 1,180 ms; SmolLM2-135M
8 × 256 11.4 → 7.8 s, and 0.90× again from the second option. Losses agree
to 1e-4 (bfloat16 rounding in another order).

Example:

  >>> sorted(compiler_options('cpu'))
  ['xla_cpu_experimental_ynn_fusion_type', 'xla_cpu_scheduler_type']
  >>> compiler_options('gpu')
  {}
  >>> step = jax.jit(lambda x: 2 * x, compiler_options=compiler_options())
  >>> step(jax.numpy.ones(2)).tolist()
  [2.0, 2.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_CPU = {
    'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
    'xla_cpu_experimental_ynn_fusion_type': '',
}
# bfloat16 steps: YNNPACK takes each product alone (no elementwise fusions,
# which keep full-size constants alive, see above); and XLA keeps the
# program's float32 -> bfloat16 casts, which it would otherwise drop where a
# float32 value is cast for a product (a norm's output, a float32 parameter),
# turning that product into a float32 one.
_CPU_BF16 = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT',
    'xla_allow_excess_precision': False,
}


def compiler_options(backend: str | None = None, *,
                     dtype: Any = None) -> dict[str, Any]:
  """The XLA options lorajax recommends for a train step on ``backend``.

  Args:
    backend: ``'cpu'``, ``'gpu'``, ``'tpu'``; ``None`` means
      ``jax.default_backend()``.
    dtype: the model's compute dtype (``None`` or ``'float32'``, or
      ``'bfloat16'``). On the CPU a bfloat16 step hands each product to
      YNNPACK (``_CPU_BF16``), which runs the float32-accumulated bfloat16
      products of ``lorajax.matmul`` on the CPU's bfloat16 units.

  Returns:
    A new dict for ``jax.jit(..., compiler_options=...)``; empty where the
    defaults are best.

  Raises:
    ValueError: a ``dtype`` that is not a floating-point type.
  """
  backend = jax.default_backend() if backend is None else backend
  if backend != 'cpu':
    return {}
  if dtype is not None:
    try:
      dtype = jnp.dtype(dtype)
    except TypeError as e:
      raise ValueError(f'compiler_options: dtype {dtype!r} is not a dtype'
                       ) from e
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f'compiler_options: dtype {dtype} is not a '
                       f'floating-point compute dtype')
    if dtype == jnp.bfloat16:
      return {**_CPU, **_CPU_BF16}
  return dict(_CPU)
