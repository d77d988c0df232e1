"""IA3 and LoHa: providers whose update is not a low-rank product, merged
exactly on every kernel layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.io import spec_json

KEY = jax.random.key(0)
USES = {
    'flax': ((5, 4), (3, 5), lambda x, w: x @ w),
    'torch': ((4, 5), (3, 5), lambda x, w: jnp.einsum('bi,oi->bo', x, w)),
    'multi_out': ((5, 2, 3), (3, 5), lambda x, w: jnp.einsum('bd,dhk->bhk', x, w)),
    'multi_in': ((2, 3, 5), (4, 2, 3), lambda x, w: jnp.einsum('bhk,hkd->bd', x, w)),
    'lhs': ((5, 4), (5, 3), lambda x, w: jax.lax.dot_general(
        w, x, (((0,), (0,)), ((), ())))),
}


def _check_provider(use, provider, *, tol=1e-5):
  """At init the adapted function is the base; with random parameters it
  equals the merged kernel's, unmerge restores the kernel, and the
  parameters' gradients equal the merged formulation's."""
  wshape, xshape, apply = USES[use]
  params = {'w': jax.random.normal(KEY, wshape)}
  x = jax.random.normal(jax.random.key(1), xshape)
  fn = lambda p, x: apply(x, p['w'])  # pylint: disable=unnecessary-lambda-assignment
  spec = lorajax.LoraSpec([('w', provider)])
  adapters = lorajax.init(spec, params, KEY, fn=fn, args=(x,))
  g = lorajax.lora(fn, spec)
  np.testing.assert_allclose(g(params, adapters, x), fn(params, x), atol=1e-6)
  adapters = jax.tree.map(
      lambda v: v + jax.random.normal(jax.random.key(2), v.shape), adapters)
  merged = lorajax.merge(params, adapters, spec)
  np.testing.assert_allclose(g(params, adapters, x), fn(merged, x),
                             rtol=1e-5, atol=10 * tol)
  back = lorajax.unmerge(merged, adapters, spec)
  np.testing.assert_allclose(back['w'], params['w'], rtol=1e-4, atol=10 * tol)
  ga = jax.grad(lambda ad: jnp.sum(g(params, ad, x) ** 2))(adapters)
  gm = jax.grad(lambda ad: jnp.sum(
      fn(lorajax.merge(params, ad, spec), x) ** 2))(adapters)
  jax.tree.map(lambda a, m: np.testing.assert_allclose(
      a, m, rtol=1e-4, atol=100 * tol), ga, gm)


@pytest.mark.parametrize('feedforward', [False, True])
@pytest.mark.parametrize('use', sorted(USES))
def test_ia3_equals_merged_and_base_at_init(use, feedforward):
  _check_provider(use, lorajax.Ia3(feedforward=feedforward))


@pytest.mark.parametrize('use', sorted(USES))
def test_loha_equals_merged_and_base_at_init(use):
  _check_provider(use, lorajax.LoHa(rank=2, alpha=4))


def test_ia3_spec_round_trips_json():
  spec = lorajax.LoraSpec([('.*value.*', lorajax.Ia3()),
                           ('.*output.*', lorajax.Ia3(feedforward=True)),
                           ('.*', 'freeze')])
  assert spec_json.spec_from_json(spec_json.spec_to_json(spec)) == spec


def test_olora_starts_where_peft_does_and_on_the_residual():
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False))
  w = net[0].weight.detach().numpy().copy()          # [out, in]
  model = peft.get_peft_model(net, peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=['0'], init_lora_weights='olora'))
  layer = model.base_model.model[0]
  params = {'w': jnp.asarray(w.T)}                   # Flax [in, out]
  spec = lorajax.LoraSpec([('w', lorajax.Lora(rank=2, alpha=4, init='olora'))])
  adapters = lorajax.init(spec, params, KEY)
  np.testing.assert_allclose(adapters['w']['a'],
                             layer.lora_A['default'].weight.detach().T,
                             atol=1e-5)
  np.testing.assert_allclose(adapters['w']['b'],
                             layer.lora_B['default'].weight.detach().T,
                             atol=1e-5)
  base = lorajax.pissa.residual_base(spec, params, adapters)
  np.testing.assert_allclose(base['w'],
                             layer.base_layer.weight.detach().T, atol=1e-5)
  fn = lambda p, x: x @ p['w']  # pylint: disable=unnecessary-lambda-assignment
  x = jax.random.normal(KEY, (3, 6))
  np.testing.assert_allclose(lorajax.lora(fn, spec)(base, adapters, x),
                             fn(params, x), atol=1e-5)
