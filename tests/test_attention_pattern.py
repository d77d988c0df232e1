"""A user's own softmax attention, found in the jaxpr and fused on the CPU.

Each case compares ``lorajax.fuse_attention(fn)`` (or ``lorajax.lora``) with
``fn`` under a plain ``jax.jit`` (XLA's own attention): values and
gradients, and whether the compiled program calls the fused kernel. Cases
the kernel cannot compute exactly must keep XLA's attention and still give
``fn``'s values.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.runtime import cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason=str(cpu_attention.why_not()))

B, T, H, D = 3, 10, 4, 8
NEG = jnp.finfo(jnp.float32).min


def _qkv(seed=0, shape=(B, T, H, D)):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, shape) for k in ks]


def _padding():
  """[B, S] real keys: full, 6 keys, none at all."""
  return jnp.ones((B, T), bool).at[1, 6:].set(False).at[2, :].set(False)


def _fused_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count('lorajax_attention_fwd')


def _check(fn, args, diff, *, fused: bool, tol=2e-5):
  """``fuse_attention(fn)`` against ``fn``: values, gradients in the
  arguments ``diff``, and whether the kernel runs."""
  g = lorajax.fuse_attention(fn)
  assert (_fused_calls(g, *args) > 0) == fused
  cot = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, *args).shape)

  def loss(f):
    return lambda *a: jnp.sum(f(*a) * cot)

  want = jax.jit(fn)(*args)
  got = jax.jit(g)(*args)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  gw = jax.jit(jax.grad(loss(fn), argnums=diff))(*args)
  gg = jax.jit(jax.grad(loss(g), argnums=diff))(*args)
  for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw)):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _plain(q, k, v, mask, scale=D ** -0.5):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) * scale
  s = jnp.where(mask[:, None, None, :], s, NEG)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)


def test_padding_mask_and_rows_with_no_key():
  q, k, v = _qkv()
  _check(_plain, (q, k, v, _padding()), (0, 1, 2), fused=True)


def test_heads_first_layout_without_mask():
  q, k, v = _qkv(1, (B, H, T, D))

  def fn(q, k, v):
    s = jnp.einsum('bhqd,bhkd->bhqk', q, k) / 3.0
    return jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(s), v)

  _check(fn, (q, k, v), (0, 1, 2), fused=True)


def test_keys_as_the_first_operand():
  """Scores laid out [B, H, S, T], the softmax over axis 2."""
  q, k, v = _qkv(2)
  mask = _padding().at[2, 0].set(True)

  def fn(q, k, v, mask):
    s = jnp.einsum('bkhd,bqhd->bhkq', k, q) * 0.3
    s = jnp.where(mask[:, None, :, None], s, -1e9)
    p = jax.nn.softmax(s, axis=2)
    return jnp.einsum('bhkq,bkhd->bqhd', p, v)

  _check(fn, (q, k, v, mask), (0, 1, 2), fused=True)


def test_traced_temperature_gets_its_gradient():
  q, k, v = _qkv(3)
  temp = jnp.float32(0.7)

  def fn(q, k, v, temp):
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k) * temp
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v)

  _check(fn, (q, k, v, temp), (0, 1, 2, 3), fused=True)


def test_per_head_and_causal_masks():
  q, k, v = _qkv(4)
  per_head = jax.random.bernoulli(jax.random.key(5), 0.7, (B, H, T, T))
  causal = jnp.tril(jnp.ones((T, T), bool))

  def heads(q, k, v, m):
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    s = jnp.where(m, s, NEG)
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v)

  def tril(q, k, v, m):
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    s = jnp.where(m[None, None], s, NEG)
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v)

  _check(heads, (q, k, v, per_head), (0, 1, 2), fused=True)
  _check(tril, (q, k, v, causal), (0, 1, 2), fused=True)


def test_hidden_where_true_and_one_head():
  """``jnp.where(pad, fill, s)`` (true hides) on [B, T, D] single-head
  inputs."""
  q, k, v = _qkv(6, (B, T, D))
  pad = ~_padding()

  def fn(q, k, v, pad):
    s = jnp.einsum('bqd,bkd->bqk', q, k)
    s = jnp.where(pad[:, None, :], NEG, s)
    return jnp.einsum('bqk,bkd->bqd', jax.nn.softmax(s), v)

  _check(fn, (q, k, v, pad), (0, 1, 2), fused=True)


def test_flax_multi_head_attention_module():
  x = jax.random.normal(jax.random.key(7), (B, T, 32))
  mha = nn.MultiHeadDotProductAttention(num_heads=4)
  params = mha.init(jax.random.key(8), x)
  mask = nn.make_attention_mask(_padding().at[2, :3].set(True),
                                _padding().at[2, :3].set(True))

  def fn(params, x):
    return mha.apply(params, x, mask=mask)

  _check(fn, (params, x), (0, 1), fused=True)


def test_users_bert_with_lora_trains_on_the_kernel():
  """The benchmark's plain Flax BERT: LoRA q/v through ``lorajax.lora``,
  the loss and adapter gradients of the fused step equal XLA's."""
  from experiments.bench import flax_bert
  model = flax_bert.FlaxBert(hidden_size=32, num_layers=2, num_heads=4,
                             intermediate_size=64, vocab_size=50)
  ids = jax.random.randint(jax.random.key(1), (B, T), 0, 50)
  mask = _padding().astype(jnp.int32).at[2, :2].set(1)
  params = model.init(jax.random.key(0), ids, mask)['params']
  spec = lorajax.LoraSpec([(flax_bert.TARGETS['qv'], lorajax.Lora(rank=4)),
                           (r'.*', 'freeze')])
  adapters = jax.tree.map(lambda a: a + 0.1,
                          lorajax.init(spec, params, jax.random.key(2)))
  g = lorajax.lora(lambda p, i, m: model.apply({'params': p}, i, m), spec)

  def loss(a):
    return jnp.sum(g(params, a, ids, mask) ** 2)

  step = jax.value_and_grad(loss)
  assert _fused_calls(step, adapters) == 2    # one per layer
  got = jax.jit(step)(adapters)
  with cpu_attention.off():
    step_xla = jax.value_and_grad(lambda a: loss(a))
    assert _fused_calls(step_xla, adapters) == 0
    want = jax.jit(step_xla)(adapters)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _hf_flax_bias(q, k, v, mask):
  """Hugging Face's Flax BERT: ``lax.select(mask > 0, 0, finfo.min)``
  added to the scores by Flax's ``dot_product_attention_weights``. Left to
  XLA: for a sequence with no key, XLA's derivative of ``s + bias`` reaches
  the hidden scores, the kernel's does not."""
  bias = jax.lax.select(mask, jnp.full(mask.shape, 0.0),
                        jnp.full(mask.shape, NEG))[:, None, None, :]
  w = nn.attention.dot_product_attention_weights(q, k, bias=bias)
  return jnp.einsum('...hqk,...khd->...qhd', w, v)


def _bias(q, k, v, mask):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  s = s + jnp.where(mask, 0.0, -1e9)[:, None, None, :]
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v)


def _neg_inf(q, k, v, mask):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v)


def _small_fill(q, k, v, mask):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  s = jnp.where(mask[:, None, None, :], s, -100.0)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v)


def _probs_kept(q, k, v, mask):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  p = jax.nn.softmax(jnp.where(mask[:, None, None, :], s, NEG))
  return jnp.einsum('bhqk,bkhd->bqhd', p, v) + p.mean()


def _over_queries(q, k, v, mask):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  p = jax.nn.softmax(s, axis=-2)
  return jnp.einsum('bhqk,bkhd->bqhd', p, v)


def _dropout(q, k, v, mask):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  p = jax.nn.softmax(s)
  keep = jax.random.bernoulli(jax.random.key(0), 0.9, p.shape)
  return jnp.einsum('bhqk,bkhd->bqhd', jnp.where(keep, p / 0.9, 0.0), v)


def _softcap(q, k, v, mask):
  s = 5.0 * jnp.tanh(jnp.einsum('bqhd,bkhd->bhqk', q, k) / 5.0)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v)


def _jax_nn(q, k, v, mask):
  """``jax.nn.dot_product_attention``: its grouped 5-d products are not a
  form the matcher takes."""
  return jax.nn.dot_product_attention(q, k, v,
                                      mask=mask[:, None, None, :])


@pytest.mark.parametrize('fn', [_bias, _neg_inf, _small_fill, _probs_kept,
                                _over_queries, _dropout, _softcap, _jax_nn,
                                _hf_flax_bias],
                         ids=lambda f: f.__name__.strip('_'))
def test_what_the_kernel_cannot_compute_stays_with_xla(fn):
  """An additive bias, a fill of -inf (NaN rows) or above -1e9, the
  probabilities read elsewhere, a softmax over the queries, dropout and a
  softcap: no fused call, and ``fn``'s own values."""
  q, k, v = _qkv(8)
  args = (q, k, v, _padding().at[2, 0].set(True))
  _check(fn, args, (0, 1, 2), fused=False)


def test_bfloat16_attention_stays_with_xla():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(9))
  mask = _padding().at[2, 0].set(True)
  g = lorajax.fuse_attention(_plain)
  assert _fused_calls(g, q, k, v, mask) == 0
  np.testing.assert_allclose(
      jax.jit(g)(q, k, v, mask).astype(np.float32),
      jax.jit(_plain)(q, k, v, mask).astype(np.float32))


def test_switch_turns_it_off(monkeypatch):
  q, k, v = _qkv(10)
  monkeypatch.setenv(cpu_attention.SWITCH, 'xla')
  g = lorajax.fuse_attention(lambda *a: _plain(*a))
  assert _fused_calls(g, q, k, v, _padding()) == 0


def test_attention_inside_a_jitted_helper_and_a_scan():
  """A chain inside ``jax.jit`` is found through the call; one in a scanned
  layer stack through ``lax.scan``'s body."""
  q, k, v = _qkv(11)
  mask = _padding()
  inner = jax.jit(_plain)

  def jitted(q, k, v, mask):
    return inner(q, k, v, mask) * 2.0

  def scanned(q, k, v, mask):
    def layer(x, kv):
      return x + _plain(x, kv[0], kv[1], mask), None
    return jax.lax.scan(layer, q, (jnp.stack([k, k * 0.5]),
                                   jnp.stack([v, v + 1.0])))[0]

  _check(jitted, (q, k, v, mask), (0, 1, 2), fused=True)
  _check(scanned, (q, k, v, mask), (0, 1, 2), fused=True)
