"""The LoRA transform: equivalence with merged weights, gradients, errors."""

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import Lora, LoraSpec

from toy_models import Block

KEY = jax.random.key(0)


def _randomize(adapters, seed=7, scale=0.3):
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                for k, x in zip(keys, leaves)])


# ---- coverage cases: (name, module, input, rules) -------------------------


class Mlp(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, dtype=self.dtype, name='fc1')(x))
    return nn.Dense(4, dtype=self.dtype, name='fc2')(x)


class Heads(nn.Module):
  """DenseGeneral with multi-axis kernels, like attention projections."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((3, 4), name='query')(x)        # kernel [d, 3, 4]
    return nn.DenseGeneral(8, axis=(-2, -1), name='out')(jnp.tanh(q))


class Ein(nn.Module):

  @nn.compact
  def __call__(self, x):
    y = nn.Einsum((8, 5), 'bd,de->be', name='proj')(x)
    w = self.param('mix', nn.initializers.normal(), (3, 5, 2))  # [h, d, k]
    return jnp.einsum('bd,hdk->bhk', y, w)


@jax.jit
def _helper_matmul(x, w):
  return jnp.tanh(x @ w)


class Jitted(nn.Module):

  @nn.compact
  def __call__(self, x):
    w = self.param('kernel', nn.initializers.lecun_normal(), (8, 6))
    return _helper_matmul(x, w)


class Scanned(nn.Module):

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(nn.remat(Block), variable_axes={'params': 0},
                    split_rngs={'params': True}, length=3)
    x, _ = stack(name='layers')(x, None)
    return x


class Remat(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.remat(Mlp)(name='mlp')(x)


class Cond(nn.Module):

  @nn.compact
  def __call__(self, x):
    w = self.param('kernel', nn.initializers.lecun_normal(), (8, 8))
    return jax.lax.cond(x.sum() > 0, lambda v: v @ w, lambda v: -(v @ w), x)


X = jax.random.normal(jax.random.key(1), (4, 8))
CASES = {
    'dense': (Mlp(), [(r'.*/kernel', Lora(rank=2, alpha=4))]),
    'bf16_compute': (Mlp(dtype=jnp.bfloat16),
                     [(r'.*/fc1/kernel', Lora(rank=2, alpha=4))]),
    'dense_general_multi_axis': (Heads(),
                                 [(r'.*/kernel', Lora(rank=2, alpha=2))]),
    # 'mix' [h, d, k] has a free axis on each side of the contracted one:
    # shared over heads or one adapter per head must be said.
    'einsum': (Ein(), [(r'.*/mix', Lora(rank=2, alpha=2, batch_axes=())),
                       (r'.*/kernel', Lora(rank=2, alpha=2))]),
    'einsum_per_head': (Ein(), [(r'.*/mix', Lora(rank=2, batch_axes=(0,))),
                                (r'.*/kernel', Lora(rank=2, alpha=2))]),
    'jit_helper': (Jitted(), [(r'.*/kernel', Lora(rank=3))]),
    'scan_remat': (Scanned(), [(r'.*/kernel', Lora(rank=2, alpha=4))]),
    'remat': (Remat(), [(r'.*/fc2/kernel', Lora(rank=2))]),
    'cond': (Cond(), [(r'.*/kernel', Lora(rank=2, alpha=8))]),
}


def _setup(name):
  model, rules = CASES[name]
  params = model.init(KEY, X)
  spec = LoraSpec(rules + [(r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, jax.random.key(2), fn=model.apply,
                          args=(X,))
  return model, params, spec, adapters


@pytest.mark.parametrize('name', sorted(CASES))
def test_equals_base_at_init(name):
  model, params, spec, adapters = _setup(name)
  got = lorajax.lora(model.apply, spec)(params, adapters, X)
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(model.apply(params, X)))


@pytest.mark.parametrize('name', sorted(CASES))
def test_equals_merged_weights(name):
  model, params, spec, adapters = _setup(name)
  adapters = _randomize(adapters)
  got = jax.jit(lorajax.lora(model.apply, spec))(params, adapters, X)
  want = model.apply(lorajax.merge(params, adapters, spec), X)
  rtol = 2e-2 if name == 'bf16_compute' else 1e-5
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32),
                             rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize('name', ['dense', 'dense_general_multi_axis',
                                  'scan_remat', 'cond', 'einsum'])
def test_grads_equal_merged_formulation(name):
  model, params, spec, adapters = _setup(name)
  adapters = _randomize(adapters)
  fn = lorajax.lora(model.apply, spec)

  def loss_lora(ad):
    return jnp.sum(jnp.sin(fn(params, ad, X)))

  def loss_merged(ad):
    return jnp.sum(jnp.sin(model.apply(lorajax.merge(params, ad, spec), X)))

  g1 = jax.grad(loss_lora)(adapters)
  g2 = jax.grad(loss_merged)(adapters)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_scan_gets_stacked_adapters():
  _, params, _, adapters = _setup('scan_remat')
  kernel = params['params']['layers']['dense']['kernel']
  ad = adapters['params']['layers']['dense']['kernel']
  assert kernel.shape == (3, 8, 8)
  assert ad['a'].shape == (3, 8, 2) and ad['b'].shape == (3, 2, 8)
  # Independent random a per layer, b zero.
  assert not np.allclose(ad['a'][0], ad['a'][1])
  assert not np.any(ad['b'])


def test_multi_axis_adapter_shapes():
  _, _, _, adapters = _setup('dense_general_multi_axis')
  p = adapters['params']
  assert p['query']['kernel']['a'].shape == (8, 2)
  assert p['query']['kernel']['b'].shape == (2, 3, 4)
  assert p['out']['kernel']['a'].shape == (3, 4, 2)
  assert p['out']['kernel']['b'].shape == (2, 8)


def test_nnx_linear_through_split_merge():

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(8, 16, rngs=rngs)
      self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.fc1(x)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)

  def apply(p, x):
    st = nnx.State(state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graphdef, st)(x)

  spec = LoraSpec([(r'fc\d/kernel', Lora(rank=2, alpha=4)), (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, KEY))
  got = lorajax.lora(apply, spec)(params, adapters, X)
  want = apply(lorajax.merge(params, adapters, spec), X)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unmerge_inverts_merge():
  _, params, spec, adapters = _setup('dense')
  adapters = _randomize(adapters)
  back = lorajax.unmerge(lorajax.merge(params, adapters, spec), adapters, spec)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_rslora_and_alpha_scale():
  assert Lora(rank=8, alpha=16).scale == 2.0
  assert Lora(rank=4).scale == 1.0
  assert Lora(rank=16, alpha=8, use_rslora=True).scale == 2.0
  model, params, _, _ = _setup('dense')
  outs = []
  for lora in (Lora(rank=4, alpha=4), Lora(rank=4, alpha=8)):
    spec = LoraSpec([(r'.*/fc1/kernel', lora), (r'.*', 'freeze')])
    ad = _randomize(lorajax.init(spec, params, KEY))
    base = model.apply(params, X)
    outs.append(lorajax.lora(model.apply, spec)(params, ad, X) - base)
  # The update is linear in the scale only at the first layer's output; the
  # relu makes the model output differ, so compare merged deltas instead.
  spec1 = LoraSpec([(r'.*/fc1/kernel', Lora(rank=4, alpha=4)), ('.*', 'freeze')])
  spec2 = LoraSpec([(r'.*/fc1/kernel', Lora(rank=4, alpha=8)), ('.*', 'freeze')])
  ad = _randomize(lorajax.init(spec1, params, KEY))
  k0 = params['params']['fc1']['kernel']
  d1 = lorajax.merge(params, ad, spec1)['params']['fc1']['kernel'] - k0
  d2 = lorajax.merge(params, ad, spec2)['params']['fc1']['kernel'] - k0
  np.testing.assert_allclose(d2, 2 * d1, rtol=1e-5, atol=1e-6)
  assert not np.allclose(outs[0], outs[1])


def test_dropout_needs_rng_and_is_deterministic():
  model, params, _, _ = _setup('dense')
  spec = LoraSpec([(r'.*/kernel', Lora(rank=2, dropout=0.5)), ('.*', 'freeze')])
  ad = _randomize(lorajax.init(spec, params, KEY))
  fn = lorajax.lora(model.apply, spec)
  merged = model.apply(lorajax.merge(params, ad, spec), X)
  np.testing.assert_allclose(fn(params, ad, X), merged, rtol=1e-5, atol=1e-5)
  r1 = fn(params, ad, X, lora_rng=jax.random.key(5))
  r2 = fn(params, ad, X, lora_rng=jax.random.key(5))
  r3 = fn(params, ad, X, lora_rng=jax.random.key(6))
  np.testing.assert_array_equal(r1, r2)
  assert not np.allclose(r1, merged) and not np.allclose(r1, r3)


def test_dropout_differs_per_scanned_layer():
  model, params, _, _ = _setup('scan_remat')
  spec = LoraSpec([(r'.*/kernel', Lora(rank=2, dropout=0.3)), ('.*', 'freeze')])
  ad = _randomize(lorajax.init(spec, params, KEY, fn=model.apply, args=(X,)))
  fn = jax.jit(lorajax.lora(model.apply, spec))
  y = fn(params, ad, X, lora_rng=jax.random.key(3))
  assert y.shape == (4, 8) and np.all(np.isfinite(y))


# ---- training: partition, optimizer, recompilation --------------------------


def _train_setup():
  model = Mlp()
  params = model.init(KEY, X)
  spec = LoraSpec([(r'.*/fc1/kernel', Lora(rank=2, alpha=4)),
                   (r'.*/fc2/.*', 'train'),
                   (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, KEY)
  train, frozen = lorajax.partition(params, spec)
  return model, params, spec, adapters, train, frozen


def test_partition_and_combine_roundtrip():
  _, params, _, _, train, frozen = _train_setup()
  assert set(train['params']) == {'fc2'}
  assert set(frozen['params']) == {'fc1'}
  back = lorajax.combine(train, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  with pytest.raises(ValueError, match='more than one'):
    lorajax.combine(train, train)


def test_frozen_bit_identical_and_stateless_after_steps():
  model, params, spec, adapters, train, frozen = _train_setup()
  fn = lorajax.lora(model.apply, spec)
  tx = optax.adamw(1e-2)
  trainable = {'adapters': adapters, 'params': train}
  opt_state = tx.init(trainable)
  frozen_before = jax.tree.map(np.array, frozen)
  y = jnp.arange(4) % 4
  traces = []

  @jax.jit
  def step(trainable, opt_state, frozen, x, y):
    traces.append(1)

    def loss(t):
      logits = fn(lorajax.combine(t['params'], frozen), t['adapters'], x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  losses = []
  for _ in range(5):
    trainable, opt_state, value = step(trainable, opt_state, frozen, X, y)
    losses.append(float(value))
  assert len(traces) == 1, 'the step recompiled'
  assert losses[-1] < losses[0]
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # The optimizer holds state for trainable leaves only: mu and nu.
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert n_state == 2 * lorajax.count(trainable)


def test_optax_partition_gives_frozen_no_state():
  _, params, spec, _, _, _ = _train_setup()
  labels = lorajax.labels(params, spec)
  tx = lorajax.optimizer(optax.adam(1e-3), labels)
  state = tx.init(params)
  train, _ = lorajax.partition(params, spec)
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert n_state == 2 * lorajax.count(train)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert not np.any(updates['params']['fc1']['kernel'])
  assert np.all(updates['params']['fc2']['kernel'] != 0)


def test_second_call_does_not_retrace():
  model, params, spec, adapters = _setup('dense')
  fn = lorajax.lora(model.apply, spec)
  jitted = jax.jit(fn)
  jitted(params, adapters, X)
  n = jitted._cache_size()  # pylint: disable=protected-access
  jitted(params, _randomize(adapters), X + 1)
  assert jitted._cache_size() == n  # pylint: disable=protected-access


# ---- errors ----------------------------------------------------------------


def test_rule_matching_no_kernel_lists_paths():
  params = Mlp().init(KEY, X)
  spec = LoraSpec([(r'.*/qurey/kernel', Lora(rank=2)), (r'.*', 'freeze')])
  with pytest.raises(ValueError, match=r'matches no kernel.*params/fc1/kernel'):
    lorajax.init(spec, params, KEY)


def test_uncovered_leaf():
  params = Mlp().init(KEY, X)
  spec = LoraSpec([(r'.*/kernel', Lora(rank=2))])
  with pytest.raises(ValueError, match=r"'params/fc1/bias'.*covered by no rule"):
    lorajax.init(spec, params, KEY)


def test_rank_too_large():
  params = Mlp().init(KEY, X)
  spec = LoraSpec([(r'.*/fc2/kernel', Lora(rank=5)), (r'.*', 'freeze')])
  with pytest.raises(ValueError, match=r'fc2/kernel: rank 5 .* min\(in, out\) = 4'):
    lorajax.init(spec, params, KEY)


def test_adapter_on_non_kernel():
  params = Mlp().init(KEY, X)
  spec = LoraSpec([(r'.*/fc1/.*', Lora(rank=2)), (r'.*', 'freeze')])
  with pytest.raises(ValueError, match=r"'params/fc1/bias' of shape \(16,\)"):
    lorajax.init(spec, params, KEY)


def test_bad_action_and_regex():
  with pytest.raises(ValueError, match='expected an adapter'):
    LoraSpec([(r'.*', 'trian')])
  with pytest.raises(ValueError, match='does not compile'):
    LoraSpec([(r'(', 'freeze')])
  with pytest.raises(ValueError, match='rank'):
    Lora(rank=0)


class Misuse(nn.Module):

  @nn.compact
  def __call__(self, x):
    w = self.param('kernel', nn.initializers.lecun_normal(), (8, 8))
    return x @ w + jnp.sum(w)   # the kernel is also reduced: not a matmul


def test_unsupported_use_names_path_and_primitive():
  model = Misuse()
  params = model.init(KEY, X)
  spec = LoraSpec([(r'.*/kernel', Lora(rank=2)), (r'.*', 'freeze')])
  with pytest.raises(lorajax.RewriteError,
                     match=r"'params/kernel'.*primitive 'reduce_sum'"):
    lorajax.init(spec, params, KEY, fn=model.apply, args=(X,))
  adapters = lorajax.init(spec, params, KEY)
  with pytest.raises(lorajax.RewriteError, match="primitive 'reduce_sum'"):
    lorajax.lora(model.apply, spec)(params, adapters, X)


def test_multi_axis_kernel_without_fn():
  params = Heads().init(KEY, X)
  spec = LoraSpec([(r'.*/kernel', Lora(rank=2)), (r'.*', 'freeze')])
  with pytest.raises(ValueError, match='fn=model.apply'):
    lorajax.init(spec, params, KEY)


def test_adapters_that_do_not_fit():
  model, params, spec, adapters = _setup('dense')
  other = LoraSpec([(r'.*/fc1/kernel', Lora(rank=2)), (r'.*', 'freeze')])
  with pytest.raises(ValueError, match='unexpected adapters'):
    lorajax.lora(model.apply, other)(params, adapters, X)
  bad = jax.tree.map(lambda t: t[..., :1] if t.shape[-1] == 2 else t, adapters)
  with pytest.raises(ValueError, match="parameter 'a' has shape"):
    lorajax.lora(model.apply, spec)(params, bad, X)


def test_trainable_report_counts():
  _, params, spec, adapters, _, _ = _train_setup()
  text = lorajax.trainable_report(spec, params, adapters, log=False)
  n_ad = 8 * 2 + 2 * 16
  n_train = n_ad + 16 * 4 + 4
  n_all = (8 * 16 + 16 + 16 * 4 + 4) + n_ad
  assert text.splitlines()[0] == (
      f'trainable params: {n_train:,d} || all params: {n_all:,d} || '
      f'trainable%: {100 * n_train / n_all:.4f}')
  assert "rule 0 '.*/fc1/kernel'" in text and 'params/fc1/kernel' in text




def test_bert_base_rank1_query_value_report():
  from lorajax.models import bert  # pylint: disable=g-import-not-at-top
  config = bert.BertConfig.bert_base(num_labels=2)
  ids = jnp.ones((1, 8), jnp.int32)
  params = jax.eval_shape(bert.Bert(config).init, KEY, ids)['params']
  spec = LoraSpec([(r'.*/attention/(query|value)/kernel', Lora(rank=1, alpha=1)),
                   (r'classifier/.*', 'train'),
                   (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, KEY)
  text = lorajax.trainable_report(spec, params, adapters, log=False)
  first = text.splitlines()[0]
  assert first.startswith('trainable params: 38,402 || all params: ')
  assert first.endswith('trainable%: 0.0351')


@jax.custom_vjp
def _mm_vjp(x, w):
  return x @ w


_mm_vjp.defvjp(lambda x, w: (x @ w, (x, w)),
               lambda res, g: (g @ res[1].T, res[0].T @ g))


@jax.custom_jvp
def _tanh_mm(x, w):
  return jnp.tanh(x @ w)


@_tanh_mm.defjvp
def _tanh_mm_jvp(primals, tangents):
  (x, w), (dx, dw) = primals, tangents
  y = _tanh_mm(x, w)
  return y, (1 - y**2) * (dx @ w + x @ dw)


def test_kernels_inside_custom_vjp_and_custom_jvp():
  params = {'w1': jnp.linspace(-1, 1, 32).reshape(8, 4),
            'w2': jnp.linspace(1, -1, 12).reshape(4, 3)}

  def fn(p, x):
    return _tanh_mm(_mm_vjp(x, p['w1']), p['w2'])

  spec = LoraSpec([(r'w\d', Lora(rank=2))])
  adapters = _randomize(lorajax.init(spec, params, KEY))
  adapted = lorajax.lora(fn, spec)
  np.testing.assert_allclose(adapted(params, adapters, X),
                             fn(lorajax.merge(params, adapters, spec), X),
                             rtol=1e-5, atol=1e-6)
  g1 = jax.grad(lambda a: adapted(params, a, X).sum())(adapters)
  g2 = jax.grad(lambda a: fn(lorajax.merge(params, a, spec), X).sum())(adapters)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
