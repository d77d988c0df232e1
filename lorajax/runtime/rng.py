"""Faster dropout on CPU: jax's Threefry hash lowered without a loop.

Every dropout mask (``nn.Dropout``, LoRA dropout, attention dropout) draws
its bits from ``jax.random``, whose Threefry-2x32 hash jax 0.10 lowers on
CPU as a 5-iteration ``while`` loop, to keep compile times short. Each
iteration then runs as separate XLA ops over full-size ``uint32`` arrays,
and the loop copies its carried state: on a MiniLM LoRA training step at
32 × 128 tokens (1.7 s), each ``[32, 12, 128, 128]`` attention mask cost
about 20 ms in copies alone (``experiments/results/bench_peft/README.md``,
``where_minilm_32x128.md``). The
unrolled lowering, which jax uses on GPU and TPU, is one elementwise fusion.

``unroll_threefry()`` registers that unrolled lowering for CPU. The hash is
the same, so every random bit is the same (``tests/test_rng.py``); only
functions lowered afterwards change, and only in speed (jax keeps the inner
hash's lowering per shape: a shape already lowered in this process keeps
its loop until ``jax.clear_caches()``). Measured on the shipped MiniLM LoRA
training step (batch 32 x 48, dropout 0.1), interleaved in one process,
medians of 9, machine otherwise idle: 476 ms with the loop, 442 ms unrolled,
400 ms with no dropout at all (dropout's cost 76 -> 42 ms); the same losses
to the last bit.

The training loop calls it when it builds its step (``config.xla_options``,
on by default). It uses a private jax module; where that module is not as
expected it changes nothing and returns False.

Example:

  >>> import jax
  >>> key = jax.random.key(0)
  >>> before = jax.jit(lambda k: jax.random.bits(k, (4,)))(key)
  >>> unroll_threefry()
  True
  >>> after = jax.jit(lambda k: jax.random.bits(k, (4,)))(key)
  >>> bool((before == after).all())
  True
"""

from __future__ import annotations

_STATE = {'unrolled': False}


def unroll_threefry(enable: bool = True) -> bool:
  """Lowers Threefry-2x32 on CPU without a loop (``enable``) or restores
  jax's own CPU lowering (``enable=False``).

  Returns:
    True if the requested lowering is now registered; False if this jax
    does not have the private pieces it needs (nothing is changed then).
  """
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32 as tf  # pylint: disable=g-import-not-at-top
    prim = tf.threefry2x32_p
    rule = (tf._threefry2x32_lowering_rule if enable  # pylint: disable=protected-access
            else tf._threefry2x32_cpu_lowering_rule)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False
  mlir.register_lowering(prim, rule, platform='cpu')
  _STATE['unrolled'] = enable
  return True


def is_unrolled() -> bool:
  """Whether ``unroll_threefry()`` is in effect in this process."""
  return _STATE['unrolled']
