"""Kernel layouts come from the function and travel with the adapter.

One test per case of issue 12 that gave silently wrong numbers or was
refused: a square kernel stored ``[out, in]``, ``nn.vmap`` ensembles,
mixture-of-experts kernels ``[E, in, out]`` (batched ``dot_general``),
kernels used transposed (``x @ w.T``, tied embeddings through
``nn.Embed.attend``), and layouts in adapter files.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.io import adapter_files
from lorajax.training import checkpoint

KEY = jax.random.key(0)


def _randomize(adapters, seed=1):
  """Adapters with every factor random (``b`` starts at zero)."""
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, l.shape) / 2
                                   for k, l in zip(keys, leaves)])


def _check_merged(fn, params, adapters, spec, *args, tol=1e-5):
  adapted = lorajax.lora(fn, spec)(params, adapters, *args)
  merged = fn(lorajax.merge(params, adapters, spec), *args)
  np.testing.assert_allclose(adapted, merged, rtol=tol, atol=tol)


def _assert_grads_close(ga, gm, rel=2e-5):
  """Gradients equal up to float32 rounding of their largest entry."""
  assert jax.tree.structure(ga) == jax.tree.structure(gm)
  top = max(float(jnp.abs(l).max()) for l in jax.tree.leaves(gm))
  jax.tree.map(lambda a, m: np.testing.assert_allclose(
      a, m, rtol=1e-4, atol=rel * top), ga, gm)


def _flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().cost_analysis()['flops']


def _check_low_rank_gradient(fn, params, adapters, spec, x):
  """The adapters' gradient equals the merged formulation's, and XLA counts
  fewer FLOPs for it (no dense dW of the frozen kernels)."""
  g = lorajax.lora(fn, spec)

  def loss_adapted(ad):
    return jnp.sum(g(params, ad, x) ** 2)

  def loss_merged(ad):
    return jnp.sum(fn(lorajax.merge(params, ad, spec), x) ** 2)

  _assert_grads_close(jax.grad(loss_adapted)(adapters),
                      jax.grad(loss_merged)(adapters))
  fa = _flops(jax.grad(loss_adapted), adapters)
  fm = _flops(jax.grad(loss_merged), adapters)
  assert fa < 0.8 * fm, (fa, fm)


# --- 1. a square kernel stored [out, in] ------------------------------------

def torch_linear(p, x):
  return jnp.einsum('bi,oi->bo', x, p['w'])


def test_square_torch_kernel_merges_untransposed():
  params = {'w': jax.random.normal(KEY, (8, 8))}
  x = jax.random.normal(jax.random.key(1), (3, 8))
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2))])
  adapters = _randomize(lorajax.init(spec, params, KEY, fn=torch_linear,
                                     args=(x,)))
  assert adapters['w'].layout == lorajax.KernelLayout(0, (1,), (0,))
  assert adapters['w'].layout.describe() == '[out, in]'
  _check_merged(torch_linear, params, adapters, spec, x)
  # and back: unmerge is exact up to rounding.
  back = lorajax.unmerge(lorajax.merge(params, adapters, spec), adapters, spec)
  np.testing.assert_allclose(back['w'], params['w'], atol=1e-5)


def test_adapter_made_for_another_layout_is_refused():
  params = {'w': jax.random.normal(KEY, (8, 8))}
  x = jnp.ones((3, 8))
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2))])
  guessed = lorajax.init(spec, params, KEY)  # no fn: taken as [in, out]
  with pytest.raises(lorajax.RewriteError, match=r"'w'.*\[in, out\].*"
                     r"\[out, in\].*fn=apply_fn"):
    lorajax.lora(torch_linear, spec)(params, guessed, x)


def test_adapter_without_layout_is_refused_by_merge():
  params = {'w': jnp.ones((4, 4))}
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=1))])
  plain = {'w': {'a': jnp.ones((4, 1)), 'b': jnp.ones((1, 4))}}
  with pytest.raises(ValueError, match="'w' carries no kernel layout"):
    lorajax.merge(params, plain, spec)
  # ... and with_layouts reads it from the function.
  fixed = lorajax.with_layouts(plain, spec, params, fn=torch_linear,
                               args=(jnp.ones((2, 4)),))
  assert fixed['w'].layout.describe() == '[out, in]'
  _check_merged(torch_linear, params, fixed, spec, jnp.ones((2, 4)))


# --- 3. nn.vmap ensembles -----------------------------------------------------

class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='head')(nn.relu(nn.Dense(16, name='body')(x)))


Ensemble = nn.vmap(Mlp, variable_axes={'params': 0},
                   split_rngs={'params': True}, in_axes=None, out_axes=0,
                   axis_size=4)


def test_vmap_ensemble_is_refused_until_members_are_named():
  model, x = Ensemble(), jnp.ones((2, 5))
  variables = model.init(KEY, x)
  spec = lorajax.LoraSpec([(r'.*kernel', lorajax.Lora(rank=2)),
                           (r'.*', 'freeze')])
  with pytest.raises(lorajax.RewriteError, match=r'body/kernel.*batch_axes'):
    lorajax.init(spec, variables, KEY, fn=model.apply, args=(x,))


def test_vmap_ensemble_gets_one_adapter_per_member():
  model = Ensemble()
  x = jax.random.normal(KEY, (6, 5))
  variables = model.init(KEY, x)
  spec = lorajax.LoraSpec([(r'.*kernel', lorajax.Lora(rank=2, batch_axes=(0,))),
                           (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, variables, KEY, fn=model.apply,
                                     args=(x,)))
  body = adapters['params']['body']['kernel']
  head = adapters['params']['head']['kernel']
  assert body['a'].shape == (4, 5, 2) and body['b'].shape == (4, 2, 16)
  assert head['a'].shape == (4, 16, 2) and head['b'].shape == (4, 2, 3)
  _check_merged(model.apply, variables, adapters, spec, x)
  # Member 2's output moves with member 2's adapter only.
  bumped = jax.tree.map(lambda v: v, adapters)
  bumped['params']['head']['kernel'] = head.replace(b=head['b'].at[2].add(1.0))
  g = lorajax.lora(model.apply, spec)
  diff = jnp.abs(g(variables, bumped, x) - g(variables, adapters, x))
  assert float(diff[2].max()) > 1e-3
  np.testing.assert_array_equal(np.delete(np.asarray(diff), 2, axis=0), 0.0)


class WideMlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(64, name='head')(nn.relu(nn.Dense(128, name='body')(x)))


def test_vmap_ensemble_gradient_is_low_rank():
  model = nn.vmap(WideMlp, variable_axes={'params': 0},
                  split_rngs={'params': True}, in_axes=None, out_axes=0,
                  axis_size=4)()
  x = jax.random.normal(KEY, (32, 64))
  variables = model.init(KEY, x)
  spec = lorajax.LoraSpec([(r'.*kernel', lorajax.Lora(rank=4, batch_axes=(0,))),
                           (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, variables, KEY, fn=model.apply,
                                     args=(x,)))
  _check_merged(model.apply, variables, adapters, spec, x, tol=2e-5)
  _check_low_rank_gradient(model.apply, variables, adapters, spec, x)


# --- 5. mixture of experts ----------------------------------------------------

class Moe(nn.Module):
  """A dense-dispatch MoE layer: router, experts ``[E, d, f]``, ``[E, f, d]``."""
  experts: int = 4
  hidden: int = 128

  @nn.compact
  def __call__(self, x):                     # x [T, d]
    d = x.shape[-1]
    gates = jax.nn.softmax(nn.Dense(self.experts, name='router')(x))  # [T, E]
    w_in = self.param('w_in', nn.initializers.lecun_normal(),
                      (self.experts, d, self.hidden))
    w_out = self.param('w_out', nn.initializers.lecun_normal(),
                       (self.experts, self.hidden, d))
    xe = jnp.broadcast_to(x, (self.experts,) + x.shape)          # [E, T, d]
    h = jax.nn.gelu(jnp.einsum('etd,edf->etf', xe, w_in))
    ye = jnp.einsum('etf,efd->etd', h, w_out)
    return jnp.einsum('te,etd->td', gates, ye)


def test_moe_experts_get_per_expert_adapters_and_low_rank_flops():
  model = Moe()
  x = jax.random.normal(KEY, (32, 64))
  variables = model.init(KEY, x)
  spec = lorajax.LoraSpec([(r'.*/w_(in|out)', lorajax.Lora(rank=4)),
                           (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, variables, KEY, fn=model.apply,
                                     args=(x,)))
  w_in = adapters['params']['w_in']
  assert w_in.layout.describe() == '[E, in, out]'
  assert w_in['a'].shape == (4, 64, 4) and w_in['b'].shape == (4, 4, 128)
  _check_merged(model.apply, variables, adapters, spec, x, tol=2e-5)
  _check_low_rank_gradient(model.apply, variables, adapters, spec, x)


# --- 6. kernels used transposed -----------------------------------------------

def test_kernel_used_transposed():
  params = {'w': jax.random.normal(KEY, (6, 6))}
  fn = lambda p, x: x @ p['w'].T  # pylint: disable=unnecessary-lambda-assignment
  x = jax.random.normal(jax.random.key(2), (3, 6))
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2))])
  adapters = _randomize(lorajax.init(spec, params, KEY, fn=fn, args=(x,)))
  assert adapters['w'].layout.describe() == '[out, in]'
  _check_merged(fn, params, adapters, spec, x)


class TiedLm(nn.Module):

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(11, 6, name='embed')
    h = jnp.tanh(nn.Dense(6, name='mix')(embed(ids)))
    return embed.attend(h)


def test_tied_embedding_carries_lora_in_lookup_and_output():
  model = TiedLm()
  ids = jnp.array([[1, 2, 3, 10], [0, 0, 5, 7]])
  variables = model.init(KEY, ids)
  spec = lorajax.LoraSpec([(r'.*embed/embedding', lorajax.Lora(rank=2)),
                           (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, variables, KEY, fn=model.apply,
                                     args=(ids,)))
  emb = adapters['params']['embed']['embedding']
  assert emb['a'].shape == (6, 2) and emb['b'].shape == (2, 11)
  _check_merged(model.apply, variables, adapters, spec, ids)
  g = lorajax.lora(model.apply, spec)
  ga = jax.grad(lambda ad: jnp.sum(g(variables, ad, ids) ** 2))(adapters)
  gm = jax.grad(lambda ad: jnp.sum(model.apply(
      lorajax.merge(variables, ad, spec), ids) ** 2))(adapters)
  _assert_grads_close(ga, gm)


def test_other_gathers_of_a_kernel_are_refused():
  params = {'w': jnp.ones((4, 5))}
  fn = lambda p, x: p['w'][:, jnp.array([0, 2])].sum() * (x @ p['w'])  # pylint: disable=unnecessary-lambda-assignment
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=1))])
  with pytest.raises(lorajax.RewriteError, match="'w'"):
    lorajax.init(spec, params, KEY, fn=fn, args=(jnp.ones((2, 4)),))


# --- layouts in files ---------------------------------------------------------

def test_adapter_files_keep_the_layout(tmp_path):
  params = {'w': jax.random.normal(KEY, (8, 8))}
  x = jax.random.normal(jax.random.key(1), (3, 8))
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2))])
  adapters = _randomize(lorajax.init(spec, params, KEY, fn=torch_linear,
                                     args=(x,)))
  adapter_files.save_adapter(tmp_path / 'ad', spec, adapters, params)
  bundle = adapter_files.load_adapter(tmp_path / 'ad', params)
  assert bundle.adapters['w'].layout == adapters['w'].layout
  np.testing.assert_allclose(
      lorajax.merge(params, bundle.adapters, bundle.spec)['w'],
      lorajax.merge(params, adapters, spec)['w'], atol=1e-6)


def test_saving_an_adapter_without_layout_is_refused(tmp_path):
  params = {'w': jnp.ones((4, 4))}
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=1))])
  plain = {'w': {'a': jnp.ones((4, 1)), 'b': jnp.ones((1, 4))}}
  with pytest.raises(ValueError, match='carries no kernel layout'):
    adapter_files.save_adapter(tmp_path / 'ad', spec, plain, params)
  assert not (tmp_path / 'ad').exists()


def test_adapter_files_keep_batched_layouts_and_batch_axes(tmp_path):
  params = {'w': jax.random.normal(KEY, (3, 4, 5))}
  fn = lambda p, x: jnp.einsum('bi,eio->ebo', x, p['w'])  # pylint: disable=unnecessary-lambda-assignment
  x = jnp.ones((2, 4))
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2, batch_axes=(0,)))])
  adapters = _randomize(lorajax.init(spec, params, KEY, fn=fn, args=(x,)))
  adapter_files.save_adapter(tmp_path / 'ad', spec, adapters, params)
  bundle = adapter_files.load_adapter(tmp_path / 'ad', params)
  assert bundle.spec == spec
  assert bundle.adapters['w'].layout.describe() == '[E, in, out]'
  _check_merged(fn, params, bundle.adapters, bundle.spec, x)


def test_checkpoint_meta_refuses_another_layout():
  ckpt_lib = checkpoint
  params = {'w': jnp.ones((4, 4))}
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=1))])
  flax_style = lorajax.init(spec, params, KEY)
  torch_style = lorajax.init(spec, params, KEY, fn=torch_linear,
                             args=(jnp.ones((1, 4)),))
  have = ckpt_lib.make_meta(spec, {}, {'adapters': flax_style})
  want = ckpt_lib.make_meta(spec, {}, {'adapters': torch_style})
  assert have['layouts'] == {'adapters/w': {'stack': 0, 'contract': [0],
                                            'free': [1], 'batch': []}}
  with pytest.raises(ValueError, match=r'adapters/w was trained for kernel '
                     r'layout .*contract.*\[0\].*\[1\]'):
    ckpt_lib.check_compatible(have, want, '/ckpt/3')
