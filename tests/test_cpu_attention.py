"""The fused CPU attention kernel: the same values and gradients as the
plain formulas, used where it applies and nowhere else, counted in FLOPs,
and a failed build costs speed, never values."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorajax.models import ops
from lorajax.runtime import cpu_attention
from lorajax.runtime import native

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu', reason='the kernel is the CPU backend\'s')


def _plain(q, k, v, mask):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)


def _inputs(b, t, s, h, d, seed=0):
  kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, t, h, d))
  k = jax.random.normal(kk, (b, s, h, d))
  v = jax.random.normal(kv, (b, s, h, d))
  g = jax.random.normal(kg, (b, t, h, d))
  mask = np.ones((b, s), bool)
  mask[0, s // 2:] = False           # padding
  if b > 1:
    mask[-1, :] = False              # no real key: uniform attention
  return q, k, v, g, jnp.asarray(mask)


def _calls(fn, *args) -> str:
  return str(jax.make_jaxpr(fn)(*args))


def _vjp(fn, q, k, v, g):
  out, pull = jax.vjp(fn, q, k, v)
  return out, pull(g)


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
  monkeypatch.delenv(cpu_attention.SWITCH, raising=False)
  if not cpu_attention.available():
    pytest.skip(cpu_attention.why_not())


@pytest.mark.parametrize('shape', [
    (3, 5, 7, 2, 4),        # smaller than every tile
    (2, 13, 21, 3, 20),     # head size and keys padded to 16, 13 = 2·6 + 1
    (2, 1, 9, 3, 32),       # one query: the [CLS] readout
    (2, 70, 70, 2, 64),     # several tiles each way
])
def test_values_and_gradients_match_the_plain_formula(shape):
  q, k, v, g, mask = _inputs(*shape)
  fused = lambda q, k, v: ops.attention(q, k, v, mask)
  assert 'lorajax_attention_fwd' in _calls(fused, q, k, v)
  got, got_grads = _vjp(jax.jit(fused), q, k, v, g)
  want, want_grads = _vjp(lambda q, k, v: _plain(q, k, v, mask), q, k, v, g)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  for name, a, b in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.mark.parametrize('shape', [(3, 5, 7, 2, 4), (2, 13, 21, 3, 20),
                                   (2, 1, 9, 3, 32)])
def test_dropout_matches_xla_with_the_same_mask(shape, monkeypatch):
  """Dropout on the probabilities (the rng draws the same keep mask on
  either path): the kernel's values and gradients are XLA's."""
  q, k, v, g, mask = _inputs(*shape)

  def run():   # traced afresh under each setting
    fn = lambda q, k, v: ops.attention(q, k, v, mask, dropout_rate=0.3,
                                       dropout_rng=jax.random.key(7))
    return _calls(fn, q, k, v), _vjp(jax.jit(fn), q, k, v, g)

  calls, (got, got_grads) = run()
  assert 'lorajax_attention_fwd' in calls
  monkeypatch.setenv(cpu_attention.SWITCH, 'xla')
  calls, (want, want_grads) = run()
  assert 'lorajax_attention' not in calls
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  for name, a, b in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name)
  # and the dropout did something
  plain = jax.jit(lambda q, k, v: _plain(q, k, v, mask))(q, k, v)
  assert not np.allclose(got, plain, atol=1e-3)


def test_bfloat16_inputs_run_in_float32_and_come_back_in_bfloat16():
  q, k, v, g, mask = _inputs(2, 9, 9, 2, 16)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  fused = lambda q, k, v: ops.attention(q, k, v, mask)
  assert 'lorajax_attention_fwd' in _calls(fused, q, k, v)
  got = fused(q, k, v)
  assert got.dtype == jnp.bfloat16
  want = _plain(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=1e-2)


def test_xla_attention_where_the_kernel_does_not_apply(monkeypatch):
  q, k, v, _, mask = _inputs(2, 6, 6, 2, 8)
  keep_probs = lambda q, k, v: ops.attention(q, k, v, mask, save_probs=True)
  assert 'lorajax_attention' not in _calls(keep_probs, q, k, v)
  # A fresh function each time: JAX caches a function's trace.
  plain = lambda: lambda q, k, v: ops.attention(q, k, v, mask)
  with cpu_attention.off():
    assert 'lorajax_attention' not in _calls(plain(), q, k, v)
  assert 'lorajax_attention_fwd' in _calls(plain(), q, k, v)
  monkeypatch.setenv(cpu_attention.SWITCH, 'xla')
  assert cpu_attention.why_not() == f'{cpu_attention.SWITCH}=xla'
  assert 'lorajax_attention' not in _calls(plain(), q, k, v)


def test_flop_count_adds_the_kernel_products():
  b, t, s, h, d = 2, 24, 40, 3, 32
  q, k, v, g, mask = _inputs(b, t, s, h, d)
  loss = lambda q, k, v: jnp.sum(ops.attention(q, k, v, mask) * g)
  # value_and_grad: with the value dead, XLA would drop its forward p·v.
  step = lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  fused = step().lower(q, k, v).compile()
  # forward q·kᵀ and p·v; backward q·kᵀ again, pᵀ·g, g·vᵀ, ds·k, dsᵀ·q
  assert cpu_attention.kernel_flops(fused.as_text()) == (
      7 * 2 * b * h * t * s * d + 2)
  with cpu_attention.off():
    xla = step().lower(q, k, v).compile()
  # XLA's own count of its attention adds the softmax's elementwise work.
  assert cpu_attention.step_flops(fused) == pytest.approx(
      cpu_attention.step_flops(xla), rel=0.06)
  assert cpu_attention.step_flops(fused) < cpu_attention.step_flops(xla)


def test_a_failed_build_falls_back_to_xla_with_a_warning(monkeypatch,
                                                          tmp_path, caplog):
  monkeypatch.setattr(cpu_attention, '_state', {})
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')   # a "compiler" that always fails
  reason = cpu_attention.why_not()
  assert reason and 'could not build' in reason and 'attention_cpu.cc' in reason
  assert 'using XLA attention' in caplog.text
  assert not list((tmp_path / 'lorajax').glob('*'))   # no partial library
  q, k, v, g, mask = _inputs(2, 5, 7, 2, 4)
  fn = lambda q, k, v: ops.attention(q, k, v, mask)
  assert 'lorajax_attention' not in _calls(fn, q, k, v)
  np.testing.assert_allclose(fn(q, k, v), _plain(q, k, v, mask), rtol=1e-5,
                             atol=2e-6)


def test_native_build_reports_the_compiler_error_and_keeps_one_library(
    tmp_path):
  broken = tmp_path / 'broken.c'
  broken.write_text('int f( {\n')
  cc = native.find_compiler('CC', ('cc', 'gcc'))
  if cc is None:
    pytest.skip('no C compiler')
  with pytest.raises(RuntimeError, match=r'could not build .*broken\.c'):
    native.build(str(broken), 'broken-', cc, ['-O2'], (), str(tmp_path / 'o'))
  assert not os.path.exists(tmp_path / 'o') or not os.listdir(tmp_path / 'o')
  good = tmp_path / 'good.c'
  good.write_text('int f(void) { return 1; }\n')
  first = native.build(str(good), 'good-', cc, ['-O2'], (), str(tmp_path / 'o'))
  assert native.build(str(good), 'good-', cc, ['-O2'], (),
                      str(tmp_path / 'o')) == first
  assert os.listdir(tmp_path / 'o') == [os.path.basename(first)]


def _causal_mask(b, t, prefix, pad_left):
  """[B, T, prefix + T]: every query sees the prefix and the keys up to its
  own; sequence 0's first ``pad_left`` tokens are padding (hidden as keys;
  as queries they see only the prefix)."""
  s = prefix + t
  causal = np.arange(s)[None, :] <= prefix + np.arange(t)[:, None]
  mask = np.broadcast_to(causal, (b, t, s)).copy()
  mask[0, :, prefix:prefix + pad_left] = False
  return jnp.asarray(mask)


@pytest.mark.parametrize('prefix', [0, 3])
def test_causal_grouped_query_attention_matches_xla(prefix):
  """A decoder's attention: 6 query heads over 2 key/value heads, causal
  after ``prefix`` keys, left padding; the kernel forms no score above the
  diagonal and still gives XLA's values and gradients."""
  from lorajax.models import attention, llama
  cfg = llama.LlamaConfig.tiny(num_heads=6, num_kv_heads=2)
  b, t, hd = 2, 29, cfg.head_dim
  keys = jax.random.split(jax.random.key(5), 4)
  q = jax.random.normal(keys[0], (b, t, 2, 3, hd))
  k, v = (jax.random.normal(x, (b, prefix + t, 2, hd)) for x in keys[1:3])
  mask = _causal_mask(b, t, prefix, pad_left=4)
  # A query that sees no key (padding before any key) is uniform over the
  # keys up to its own (XLA's: over all keys); nothing reads it, so its
  # cotangent is zero and it is left out of the comparison.
  sees = jnp.any(mask, axis=-1)[:, :, None, None, None]
  assert bool(jnp.all(sees)) == (prefix > 0)
  g = jnp.where(sees, jax.random.normal(keys[3], q.shape), 0.0)
  fused = lambda q, k, v: attention.attend_in_blocks(
      cfg, q, k, v, mask, causal_offset=prefix)
  assert attention.fused_applies(cfg, q, k, v)
  assert 'lorajax_attention_fwd' in _calls(fused, q, k, v)
  got, got_grads = _vjp(jax.jit(fused), q, k, v, g)
  want, want_grads = _vjp(
      lambda q, k, v: attention.attend(cfg, q, k, v, mask), q, k, v, g)
  np.testing.assert_allclose(jnp.where(sees, got, 0.0),
                             jnp.where(sees, want, 0.0), rtol=1e-5, atol=2e-6)
  for name, x, y in zip('qkv', got_grads, want_grads):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=name)
  # The causal kernel's products: the scores on and below the diagonal.
  compiled = jax.jit(fused).lower(q, k, v).compile()
  pairs = cpu_attention.visible_pairs(t, prefix + t, prefix)
  assert pairs < 0.6 * t * (prefix + t)
  assert cpu_attention.kernel_flops(compiled.as_text()) == (
      2 * 2 * b * 6 * pairs * hd + 1)


def test_a_decoder_step_is_the_same_with_the_kernel(monkeypatch):
  from lorajax.models import llama
  cfg = llama.LlamaConfig.tiny(num_heads=4, num_kv_heads=2)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 21)), jnp.int32)
  pad = np.ones((3, 21), np.int32)
  pad[1, :5] = 0
  model = llama.Llama(cfg)
  params = model.init(jax.random.key(0), tokens[:, :4])['params']

  def value_and_grad():   # traced afresh under each setting
    def loss(p):
      logits = model.apply({'params': p}, tokens,
                           attention_mask=jnp.asarray(pad))
      return jnp.sum(jnp.where(pad[..., None] > 0, logits, 0.0) ** 2) / 1e3
    return jax.jit(jax.value_and_grad(loss))

  fused_loss, fused_grads = value_and_grad()(params)
  monkeypatch.setenv(cpu_attention.SWITCH, 'xla')
  xla_loss, xla_grads = value_and_grad()(params)
  np.testing.assert_allclose(fused_loss, xla_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               fused_grads, xla_grads)


def test_a_nan_input_shows_in_the_output_as_with_xla():
  """A diverged run must show: a NaN in a query, key or value makes its
  rows NaN, never a finite number."""
  q, k, v, _, mask = _inputs(2, 9, 9, 2, 16)
  fused = jax.jit(lambda q, k, v: ops.attention(q, k, v, mask))
  for which in range(3):
    args = [q, k, v]
    args[which] = args[which].at[0, 3].set(jnp.nan)   # a real key
    out = fused(*args)
    want = _plain(*args, mask)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    assert bool(jnp.any(jnp.isnan(out)))


def test_bad_shapes_and_rates_are_refused_by_name():
  q, k, v, _, mask = _inputs(2, 5, 7, 2, 4)
  with pytest.raises(Exception, match=r'mask must be \[B, S\] or \[B, T, S\]'):
    jax.block_until_ready(cpu_attention.forward(q, k, v, mask[:, :3]))
  with pytest.raises(Exception, match=r'k must be \[B, S, Hkv, D\]'):
    jax.block_until_ready(cpu_attention.forward(q, k[..., :1, :3], v, mask))
  keep = jnp.ones((2, 2, 5, 7), bool)
  with pytest.raises(ValueError, match='dropout rate must be in'):
    cpu_attention.forward(q, k, v, mask, keep=keep, rate=1.0)
  with pytest.raises(ValueError, match='causal_offset must be >= 0'):
    cpu_attention.forward(q, k, v, mask, causal_offset=-2)
