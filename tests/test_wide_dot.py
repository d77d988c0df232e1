"""lorajax.matmul's wide float32 products: a product whose right operand
has a wide free axis (an LM head over the vocabulary) multiplied in blocks
of columns, the same values, and where lorajax.lora uses it."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import matmul
from test_matmul import dots_in

NT = (((1,), (1,)), ((), ()))     # h·Eᵀ, a tied head
NN3 = (((2,), (0,)), ((), ()))    # [B, T, d]·[d, V], an untied head


def _normal(key, shape):
  return jax.random.normal(jax.random.key(key), shape)


@pytest.mark.parametrize('ls,rs,dn', [((8, 16), (1000, 16), NT),
                                      ((2, 4, 16), (16, 1000), NN3)])
def test_blocks_give_the_product_and_both_gradients(ls, rs, dn):
  lhs, rhs = _normal(1, ls), _normal(2, rs)
  # 1000 columns in blocks of 96: ten whole blocks and a last one of 40.
  blocked = lambda a, b: matmul.blocked_dot_general(a, b, dn, block=96)
  plain = lambda a, b: lax.dot_general(a, b, dn)
  np.testing.assert_allclose(blocked(lhs, rhs), plain(lhs, rhs),
                             rtol=1e-6, atol=1e-5)
  y = jnp.arange(np.prod(ls[:-1]) if dn == NN3 else ls[0]) % 1000
  def loss(f):
    return lambda a, b: optax.softmax_cross_entropy_with_integer_labels(
        f(a, b).reshape(-1, 1000), y).mean()
  got = jax.grad(loss(blocked), argnums=(0, 1))(lhs, rhs)
  want = jax.grad(loss(plain), argnums=(0, 1))(lhs, rhs)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_only_wide_float32_products_with_enough_rows_are_split():
  h = jnp.ones((matmul.WIDE_ROWS, 8))
  e = jnp.ones((matmul.WIDE_MIN, 8))
  blocks = -(-matmul.WIDE_MIN // matmul.WIDE_BLOCK)
  assert matmul.wide_blocks(h, e, NT) == blocks
  assert matmul.wide_blocks(h, e.T, (((1,), (0,)), ((), ()))) == blocks
  assert matmul.wide_blocks(h, e[:-1], NT) == 0              # too narrow
  assert matmul.wide_blocks(h[:-1], e, NT) == 0              # too few rows
  bf = jnp.bfloat16
  assert matmul.wide_blocks(h.astype(bf), e.astype(bf), NT) == 0
  assert matmul.wide_blocks(h, e, NT, jnp.bfloat16) == 0     # asked for bf16
  e3 = jnp.ones((2, matmul.WIDE_MIN, 8))                     # two free axes
  assert matmul.wide_blocks(h, e3, (((1,), (2,)), ((), ()))) == 0
  batched = (((2,), (2,)), ((0,), (0,)))
  assert matmul.wide_blocks(jnp.ones((2, 512, 8)), e3, batched) == 0


def test_blocked_product_refuses_what_it_does_not_split():
  e3 = jnp.ones((2, 100, 8))
  with pytest.raises(ValueError, match=r'batch axes \(0,\) × \(0,\)'):
    matmul.blocked_dot_general(jnp.ones((2, 4, 8)), e3,
                               (((2,), (2,)), ((0,), (0,))))
  with pytest.raises(ValueError, match=r'free axes \(0, 1\) of \(2, 100, 8\)'):
    matmul.blocked_dot_general(jnp.ones((4, 8)), e3, (((1,), (2,)), ((), ())))


class _TiedLm(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, 16, name='embed')
    h = nn.Dense(16, name='proj')(embed(ids))
    return embed.attend(h)


def _dots(fn, *args):
  """Every dot_general of ``fn``'s forward pass, inner jaxprs included."""
  return dots_in(jax.make_jaxpr(fn)(*args).jaxpr)


def test_lora_multiplies_a_wide_head_in_blocks_with_the_same_values():
  vocab = matmul.WIDE_MIN + 100
  model = _TiedLm(vocab)
  ids = jnp.arange(matmul.WIDE_ROWS).reshape(4, -1) % vocab
  params = model.init(jax.random.key(0), ids)['params']
  spec = lorajax.LoraSpec([(r'proj/kernel', lorajax.Lora(rank=2, alpha=4)),
                           (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, jax.random.key(1))
  adapters = jax.tree.map(lambda a: a + 0.01, adapters)   # b nonzero too
  adapted = lorajax.lora(lambda p, x: model.apply({'params': p}, x), spec)
  heads = [e for e in _dots(adapted, params, adapters, ids)
           if e.outvars[0].aval.shape[-1] != 16 and
           e.outvars[0].aval.shape[-1] != 2]
  # The head's product in blocks of WIDE_BLOCK columns (the last narrower).
  widths = sorted(e.outvars[0].aval.shape[-1] for e in heads)
  assert len(widths) == -(-vocab // matmul.WIDE_BLOCK), widths
  assert sum(widths) == vocab and max(widths) == matmul.WIDE_BLOCK
  merged = lorajax.merge(params, adapters, spec)
  np.testing.assert_allclose(adapted(params, adapters, ids),
                             model.apply({'params': merged}, ids),
                             rtol=1e-5, atol=1e-5)
  loss = lambda a: adapted(params, a, ids).sum()
  grads = jax.grad(loss)(adapters)
  def merged_loss(a):
    return model.apply({'params': lorajax.merge(params, a, spec)}, ids).sum()
  want = jax.grad(merged_loss)(adapters)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_the_blocked_head_step_holds_no_more_memory_than_the_plain_one():
  # The backward pass is the plain product's: no blocks of the logits'
  # gradient kept alive together.
  h, e = jnp.ones((512, 64)), jnp.ones((2 * matmul.WIDE_MIN, 64))
  y = jnp.zeros(512, jnp.int32)
  def temp_bytes(product):
    def loss(h, e):
      return optax.softmax_cross_entropy_with_integer_labels(
          product(h, e, NT), y).mean()
    step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, e).compile(
        compiler_options=lorajax.compiler_options('cpu'))
    return step.memory_analysis().temp_size_in_bytes
  assert temp_bytes(matmul.blocked_dot_general) <= temp_bytes(
      lax.dot_general)
