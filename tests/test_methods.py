"""The PEFT method family: rsLoRA/per-rule ranks, DoRA, QLoRA, bottleneck."""

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import Lora, LoraSpec
from lorajax.methods import bottleneck
from lorajax.methods import dora
from lorajax.methods import qlora
from lorajax.methods import quant

from toy_models import KEY, MODELS, X, Heads, LhsDot, Mlp, Scanned  # pylint: disable=g-multiple-import
from toy_models import assert_close as _close
from toy_models import perturb as _randomize
TARGET = r'.*kernel'


def _setup(name, provider, x=X):
  model = MODELS[name]
  params = model.init(KEY, x)
  spec = LoraSpec([(TARGET, provider), (r'.*', 'freeze')])
  return model, params, spec


def _init(spec, params, model, x=X):
  return lorajax.init(spec, params, jax.random.key(2), fn=model.apply,
                      args=(x,))



# ---- rsLoRA and per-rule rank / alpha ------------------------------------


def test_per_rule_rank_and_alpha():
  model = Mlp()
  params = model.init(KEY, X)
  spec = LoraSpec([(r'.*/fc1/kernel', Lora(rank=2, alpha=4)),
                   (r'.*/fc2/kernel', Lora(rank=3, alpha=6, use_rslora=True)),
                   (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, KEY))
  ad = adapters['params']
  assert ad['fc1']['kernel']['a'].shape == (8, 2)
  assert ad['fc2']['kernel']['b'].shape == (3, 4)
  assert spec.rules[1][1].scale == pytest.approx(6 / np.sqrt(3))
  got = lorajax.lora(model.apply, spec)(params, adapters, X)
  _close(got, model.apply(lorajax.merge(params, adapters, spec), X))


# ---- every adapter method equals its base at init ------------------------

INIT_CASES = [(m, p) for m in MODELS for p in (
    dora.Dora(rank=2, alpha=4), bottleneck.Bottleneck(size=3, act='gelu'))]


@pytest.mark.parametrize('name,provider', INIT_CASES,
                         ids=[f'{m}-{type(p).__name__}' for m, p in INIT_CASES])
def test_equals_base_at_init(name, provider):
  model, params, spec = _setup(name, provider)
  adapters = _init(spec, params, model)
  got = jax.jit(lorajax.lora(model.apply, spec))(params, adapters, X)
  _close(got, model.apply(params, X), 1e-6)


# ---- DoRA ------------------------------------------------------------------


def test_dora_magnitude_starts_at_column_norm():
  model, params, spec = _setup('scan', dora.Dora(rank=2))
  adapters = _init(spec, params, model)
  kernel = params['params']['layers']['dense']['kernel']       # [3, in, out]
  m = adapters['params']['layers']['dense']['kernel']['m']
  assert m.shape == (3, 8)
  _close(m, np.linalg.norm(np.asarray(kernel), axis=1), 1e-6)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_dora_merge_equals_adapted_forward(name):
  model, params, spec = _setup(name, dora.Dora(rank=2, alpha=4))
  adapters = _randomize(_init(spec, params, model))   # random b, perturbed m
  got = jax.jit(lorajax.lora(model.apply, spec))(params, adapters, X)
  merged = lorajax.merge(params, adapters, spec)
  _close(got, model.apply(merged, X), 1e-5)
  assert not np.allclose(got, model.apply(params, X), atol=1e-3)


def test_dora_norm_is_detached_as_in_peft():
  w = jax.random.normal(KEY, (8, 5))
  params = {'params': {'kernel': w}}
  provider = dora.Dora(rank=2, alpha=3)
  spec = LoraSpec([(r'.*', provider)])
  ad = _randomize(lorajax.init(spec, params, KEY))

  def apply(p, x):
    return x @ p['params']['kernel']

  fn = lorajax.lora(apply, spec)

  def reference(ad, detach):
    a, b, m = (ad['params']['kernel'][k] for k in 'abm')
    v = w + provider.scale * a @ b
    norm = jnp.linalg.norm(v, axis=0)
    norm = jax.lax.stop_gradient(norm) if detach else norm
    return (m / norm) * (X @ w + provider.scale * (X @ a) @ b)

  def loss(f):
    return lambda ad: jnp.sum(jnp.sin(f(ad)))

  got = jax.grad(loss(lambda ad: fn(params, ad, X)))(ad)
  want = jax.grad(loss(lambda ad: reference(ad, True)))(ad)
  attached = jax.grad(loss(lambda ad: reference(ad, False)))(ad)
  for g, r, n in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                     jax.tree.leaves(attached)):
    _close(g, r, 1e-4)
  assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(attached)[0])


def test_dora_unmerge_raises():
  model, params, spec = _setup('dense', dora.Dora(rank=2))
  adapters = _init(spec, params, model)
  with pytest.raises(ValueError, match='cannot be undone'):
    lorajax.unmerge(params, adapters, spec)


# ---- bottleneck adapters ---------------------------------------------------


def test_bottleneck_matches_reference_on_dense():
  model, params, spec = _setup('dense', bottleneck.Bottleneck(size=3))
  adapters = _randomize(_init(spec, params, model))
  got = lorajax.lora(model.apply, spec)(params, adapters, X)

  def layer(p, ad, x):
    y = x @ p['kernel']
    h = jax.nn.relu(y @ ad['down'] + ad['down_bias'])
    return y + h @ ad['up'] + ad['up_bias'] + p['bias']

  p, ad = params['params'], adapters['params']
  h = jax.nn.relu(layer(p['fc1'], ad['fc1']['kernel'], X))
  _close(got, layer(p['fc2'], ad['fc2']['kernel'], h))
  with pytest.raises(ValueError, match='cannot be'):
    lorajax.merge(params, adapters, spec)


def test_houlsby_and_pfeiffer_rules_match_bert_paths():
  from lorajax.models import bert  # pylint: disable=g-import-not-at-top
  cfg = bert.BertConfig(vocab_size=32, hidden_size=8, num_layers=2,
                        num_heads=2, intermediate_size=16, max_position=16)
  ids = jnp.ones((2, 5), jnp.int32)
  model = bert.Bert(cfg)
  variables = jax.jit(model.init)(KEY, ids)
  base = jax.jit(model.apply)(variables, ids).logits
  for rules, count in ((bottleneck.houlsby_rules(4), 4),
                       (bottleneck.pfeiffer_rules(4, 'gelu'), 2)):
    spec = LoraSpec(rules + [(r'.*', 'freeze')])
    adapted = lorajax.resolve(spec, variables).adapted
    assert len(adapted) == count
    adapters = lorajax.init(spec, variables, KEY)
    got = jax.jit(lorajax.lora(model.apply, spec))(variables, adapters, ids)
    _close(got.logits, base, 1e-6)


def test_providers_round_trip_through_spec_json():
  from lorajax.io import spec_json  # pylint: disable=g-import-not-at-top
  from lorajax.methods import qlora  # pylint: disable=g-import-not-at-top
  spec = LoraSpec([('a', dora.Dora(rank=2, use_rslora=True)),
                   ('b', qlora.QLora(rank=4, quant='int8')),
                   ('c', qlora.Quantized('nf4', double_quant=False)),
                   ('d', bottleneck.Bottleneck(8, 'gelu')),
                   ('.*', 'freeze')])
  assert spec_json.spec_from_json(spec_json.spec_to_json(spec)) == spec


# ---- PiSSA -----------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(MODELS))
def test_pissa_starts_at_the_principal_part_and_equals_base(name):
  provider = Lora(rank=2, alpha=4, init='pissa')
  model, params, spec = _setup(name, provider)
  adapters = _init(spec, params, model)
  base = lorajax.pissa.residual_base(spec, params, adapters)
  # Adapted function on the residual == the pretrained function.
  got = jax.jit(lorajax.lora(model.apply, spec))(base, adapters, X)
  _close(got, model.apply(params, X), 1e-5)
  # s·a·b is the best rank-2 approximation of each kernel (Eckart-Young):
  # the residual's spectrum is the kernel's with the top 2 values removed.
  for path, leaf in lorajax.spec.flatten_paths(params):
    if not path.endswith('kernel'):
      continue
    factors = lorajax.spec.get_by_path(adapters, path)
    layout = factors.layout
    w = np.asarray(lorajax.kernels.kernel_matrix(leaf, layout))
    r = np.asarray(lorajax.kernels.kernel_matrix(
        lorajax.spec.get_by_path(base, path), layout))
    sw = np.linalg.svd(w, compute_uv=False)
    sr = np.linalg.svd(r, compute_uv=False)
    np.testing.assert_allclose(sr[..., :sr.shape[-1] - 2], sw[..., 2:],
                               rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(factors['b'])).max() > 0.1


@pytest.mark.parametrize('name', sorted(MODELS))
def test_pissa_to_lora_fits_the_original_base(name):
  model, params, spec = _setup(name, Lora(rank=2, alpha=4, init='pissa'))
  adapters = _init(spec, params, model)
  base = lorajax.pissa.residual_base(spec, params, adapters)
  trained = _randomize(adapters)
  want = model.apply(lorajax.merge(base, trained, spec), X)
  lora_spec, lora_ad = lorajax.pissa.to_lora(spec, params, trained)
  provider = lora_spec.rules[0][1]
  assert (provider.rank, provider.init) == (4, 'kaiming')
  assert provider.scale == pytest.approx(spec.rules[0][1].scale)
  _close(model.apply(lorajax.merge(params, lora_ad, lora_spec), X), want,
         1e-4)
  got = jax.jit(lorajax.lora(model.apply, lora_spec))(params, lora_ad, X)
  _close(got, want, 1e-4)
  assert not np.allclose(want, model.apply(params, X), atol=1e-3)


def test_pissa_refuses_what_it_cannot_do():
  for cls in (dora.Dora, qlora.QLora):
    with pytest.raises(ValueError, match='pissa'):
      cls(rank=2, init='pissa')
  with pytest.raises(ValueError, match='init must be one of'):
    Lora(rank=2, init='svd')
  spec = LoraSpec([(TARGET, Lora(rank=2, init='pissa'))])
  with pytest.raises(ValueError, match='pissa.to_lora'):
    lorajax.pissa.check_portable(spec, 'save_adapter')
