"""The lean-backward ops equal the plain formulas, in values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.models import bert
from lorajax.models import ops
from lorajax.runtime import cpu_attention

B, T, S, HEADS, D = 3, 5, 7, 2, 4


def _plain_attention(q, k, v, mask, keep=None, rate=0.0):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  if keep is not None:
    p = jnp.where(keep, p / (1.0 - rate), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', p, v)


def _qkv_mask():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (B, T, HEADS, D))
  k = jax.random.normal(kk, (B, S, HEADS, D))
  v = jax.random.normal(kv, (B, S, HEADS, D))
  mask = np.ones((B, S), bool)
  mask[1, 4:] = False  # padding
  mask[2, :] = False   # a row with no real key attends uniformly
  return q, k, v, jnp.asarray(mask)


def _value_and_grads(fn, *args):
  cot = jax.random.normal(jax.random.key(1), fn(*args).shape)
  y, vjp = jax.vjp(fn, *args)
  return y, vjp(cot)


@pytest.fixture
def xla_attention(monkeypatch):
  """XLA's attention (``ops.attention``'s own formulas) even where the
  fused CPU kernel would run (``tests/test_cpu_attention.py`` has its)."""
  monkeypatch.setenv(cpu_attention.SWITCH, 'xla')


@pytest.mark.parametrize('save_probs', [False, True])
@pytest.mark.parametrize('path', ['xla', 'default'])
def test_attention_matches_plain_softmax(save_probs, path, monkeypatch):
  if path == 'xla':
    monkeypatch.setenv(cpu_attention.SWITCH, 'xla')
  q, k, v, mask = _qkv_mask()
  want, want_grads = _value_and_grads(
      lambda q, k, v: _plain_attention(q, k, v, mask), q, k, v)
  got, got_grads = _value_and_grads(
      lambda q, k, v: ops.attention(q, k, v, mask, save_probs=save_probs),
      q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_attention_dropout_matches_plain_with_the_same_mask():
  q, k, v, mask = _qkv_mask()
  rng, rate = jax.random.key(3), 0.3
  keep = jax.random.bernoulli(rng, 1.0 - rate, (B, HEADS, T, S))
  want, want_grads = _value_and_grads(
      lambda q, k, v: _plain_attention(q, k, v, mask, keep, rate), q, k, v)
  got, got_grads = _value_and_grads(
      lambda q, k, v: ops.attention(q, k, v, mask, dropout_rate=rate,
                                    dropout_rng=rng), q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_gelu_matches_exact_gelu():
  x = jnp.linspace(-6.0, 6.0, 101)
  want, (want_grad,) = _value_and_grads(
      lambda x: nn.gelu(x, approximate=False), x)
  got, (got_grad,) = _value_and_grads(ops.gelu, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)
  assert ops.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def _tiny(lean):
  return bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=2,
                         num_heads=2, intermediate_size=32, max_position=16,
                         lean_backward=lean)


def _lora_loss_and_grads(lean):
  """Loss and adapter gradients of a LoRA step on a tiny padded batch."""
  model = bert.Bert(_tiny(lean))
  ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 50)
  mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
  labels = jnp.array([0, 1])
  params = bert.Bert(_tiny(False)).init(jax.random.key(1), ids)['params']
  spec = lorajax.LoraSpec([(r'.*/(query|value|intermediate)/kernel',
                            lorajax.Lora(rank=2, alpha=4)),
                           (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, jax.random.key(2))
  adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # b != 0
  fn = lorajax.lora(lambda p, i, m: model.apply({'params': p}, i, m).logits,
                    spec)

  def loss(ad):
    logits = fn(params, ad, ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  return jax.jit(jax.value_and_grad(loss))(adapters)


def test_lean_bert_step_equals_plain_step():
  lean_loss, lean_grads = _lora_loss_and_grads(True)
  plain_loss, plain_grads = _lora_loss_and_grads(False)
  np.testing.assert_allclose(lean_loss, plain_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               lean_grads, plain_grads)


def test_lean_bert_trains_with_dropout():
  config = _tiny(True).replace(hidden_dropout=0.1, attention_dropout=0.2)
  model = bert.Bert(config)
  ids = jnp.ones((2, 6), jnp.int32)
  params = model.init(jax.random.key(0), ids)['params']

  def loss(p, key):
    out = model.apply({'params': p}, ids, deterministic=False,
                      rngs={'dropout': key})
    return jnp.sum(out.logits ** 2)

  g1 = jax.grad(loss)(params, jax.random.key(1))
  g2 = jax.grad(loss)(params, jax.random.key(2))
  leaves = jax.tree.leaves(g1)
  assert all(np.all(np.isfinite(x)) for x in leaves)
  assert any(not np.allclose(a, b) for a, b in zip(leaves,
                                                   jax.tree.leaves(g2)))


def test_lean_backward_needs_less_memory():
  def temp_bytes(lean):
    config = _tiny(lean).replace(hidden_size=32, num_heads=4,
                                 intermediate_size=128, max_position=64)
    model = bert.Bert(config)
    ids = jnp.ones((8, 64), jnp.int32)
    params = model.init(jax.random.key(0), ids)['params']
    grad = jax.jit(jax.grad(
        lambda p: jnp.sum(model.apply({'params': p}, ids).logits)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  # 0.74 here; 0.63 on a MiniLM LoRA step (batch 32 x 128).
  assert temp_bytes(True) < 0.85 * temp_bytes(False)


@pytest.mark.parametrize('dropout,save_probs', [(False, False), (True, False),
                                                 (False, True)])
def test_grouped_attention_equals_whole_batch(monkeypatch, xla_attention,
                                              dropout, save_probs):
  """On the CPU a batch whose scores outgrow ``CPU_SCORE_BYTES`` runs in
  groups of sequences: same values and gradients as the whole batch (with
  the same dropout mask), padding and an all-masked row included."""
  q, k, v, mask = _qkv_mask()
  kwargs = {'save_probs': save_probs}
  if dropout:
    kwargs.update(dropout_rate=0.3, dropout_rng=jax.random.key(3))

  def run(score_bytes):
    monkeypatch.setattr(ops, 'CPU_SCORE_BYTES', score_bytes)
    return _value_and_grads(
        lambda q, k, v: ops.attention(q, k, v, mask, **kwargs), q, k, v)

  per_sequence = 4 * HEADS * T * S
  assert ops.batch_chunk(B, per_sequence) == B   # the defaults: whole
  whole, whole_grads = run(0)
  monkeypatch.setattr(ops, 'CPU_SCORE_BYTES', per_sequence)
  assert ops.batch_chunk(B, per_sequence) == 1   # three groups of one
  grouped, grouped_grads = run(per_sequence)
  np.testing.assert_allclose(grouped, whole, rtol=1e-6, atol=1e-7)
  for g, w in zip(grouped_grads, whole_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_batch_chunk_fits_the_scores_in_few_groups(monkeypatch):
  monkeypatch.setattr(ops, 'CPU_SCORE_BYTES', 100)
  assert ops.batch_chunk(12, 30) == 3     # largest divisor with 3·30 <= 100
  assert ops.batch_chunk(12, 1000) == 1   # not even one fits: one a group
  assert ops.batch_chunk(7, 30) == 1      # a prime batch: 7 groups of one
  assert ops.batch_chunk(64, 1000) == 4   # 16 groups at most
  assert ops.batch_chunk(17, 1000) == 17  # 17 groups is too many: whole
  monkeypatch.setattr(ops, 'CPU_SCORE_BYTES', 0)
  assert ops.batch_chunk(12, 30) == 12    # 0 turns grouping off


def test_grouped_attention_keeps_xla_flop_count(monkeypatch, xla_attention):
  """The groups are unrolled: XLA's cost analysis (the profile's FLOPs and
  utilization) counts every group, not one loop body."""
  q, k, v, mask = _qkv_mask()

  def flops(score_bytes):
    monkeypatch.setattr(ops, 'CPU_SCORE_BYTES', score_bytes)
    loss = lambda q, k, v: jnp.sum(ops.attention(q, k, v, mask) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        q, k, v).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']

  whole = flops(0)
  assert flops(4 * HEADS * T * S) == pytest.approx(whole, rel=0.02)
