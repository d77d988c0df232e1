"""Quantized frozen bases: NF4 / int8 formats, QLoRA, memory of the step."""

import statistics

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import Lora, LoraSpec
from lorajax.methods import qlora
from lorajax.methods import quant

from toy_models import KEY, MODELS, X, Heads, LhsDot, Mlp, Scanned  # pylint: disable=g-multiple-import
from toy_models import assert_close as _close
from toy_models import perturb as _randomize



NORMAL = jax.random.normal(jax.random.key(3), (256, 256))  # 1024 blocks


# ---- the formats -----------------------------------------------------------


def test_nf4_levels_are_normal_quantiles():
  # QLoRA: 8 positive and 7 negative quantiles of N(0, 1) (between 0.5 and
  # 1 - 1/2·(1/32 + 1/30)), an exact zero, normalized to [-1, 1].
  offset = 0.5 * (1 / 32 + 1 / 30)
  ppf = statistics.NormalDist().inv_cdf
  pos = [ppf(p) for p in np.linspace(1 - offset, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(1 - offset, 0.5, 8)[:-1]]
  levels = np.sort(np.array(pos + [0.0] + neg)) / max(pos)
  assert quant.NF4_LEVELS.shape == (16,)
  assert np.count_nonzero(quant.NF4_LEVELS == 0.0) == 1
  assert quant.NF4_LEVELS[0] == -1.0 and quant.NF4_LEVELS[-1] == 1.0
  np.testing.assert_allclose(quant.NF4_LEVELS, levels, atol=2e-6)


def _nearest_level_reference(x, block=64):
  """Block-wise absmax + nearest NF4 level, by brute force in numpy."""
  blocks = np.asarray(x, np.float64).reshape(-1, block)
  absmax = np.abs(blocks).max(1, keepdims=True)
  levels = quant.NF4_LEVELS.astype(np.float64)
  idx = np.abs((blocks / absmax)[..., None] - levels).argmin(-1)
  return (levels[idx] * absmax).reshape(np.shape(x))


def test_nf4_round_trip_follows_the_code_book():
  node = quant.quantize_nf4(NORMAL, double_quant=False)
  got = np.asarray(node.dequantize())
  # Every value is a code-book level times its block's absmax, and it is the
  # nearest one.
  blocks = got.reshape(-1, 64) / np.asarray(node.absmax)[:, None]
  assert np.all(np.min(np.abs(blocks[..., None] - quant.NF4_LEVELS), -1)
                < 1e-6)
  _close(got, _nearest_level_reference(NORMAL), 1e-6)
  err = np.abs(got - np.asarray(NORMAL))
  # N(0, 1) in blocks of 64: mean |error| ≈ 0.073 (absmax ≈ 2.4, level gaps
  # 0.08-0.3); the largest gap (0.30, between the two most negative
  # levels) bounds any error by 0.152·absmax.
  assert 0.06 < err.mean() < 0.085
  max_gap = np.max(np.diff(quant.NF4_LEVELS))
  assert np.all(err.reshape(-1, 64)
                <= max_gap / 2 * np.asarray(node.absmax)[:, None] + 1e-6)


def test_nf4_double_quant_costs_little_accuracy():
  single = np.abs(np.asarray(quant.quantize_nf4(
      NORMAL, double_quant=False).dequantize()) - np.asarray(NORMAL)).mean()
  node = quant.quantize_nf4(NORMAL)
  assert node.absmax.dtype == jnp.int8
  double = np.abs(np.asarray(node.dequantize()) - np.asarray(NORMAL)).mean()
  assert double < 1.01 * single


def test_bits_per_parameter():
  w = jnp.ones((256, 1024))
  assert quant.bits_per_param(quant.quantize_nf4(w)) == pytest.approx(
      4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)                    # ≈ 4.127
  assert quant.bits_per_param(quant.quantize_nf4(w, double_quant=False)
                              ) == pytest.approx(4.5)
  assert quant.bits_per_param(quant.quantize_int8(w)) == pytest.approx(
      8 + 32 / 256)


def test_int8_error_is_at_most_half_a_step_per_output_unit():
  node = quant.quantize_int8(NORMAL)
  assert node.scale.shape == (1, 256)
  err = np.abs(np.asarray(node.dequantize()) - np.asarray(NORMAL))
  assert np.all(err <= np.asarray(node.scale) / 2 + 1e-7)


def test_quantized_node_is_one_leaf_of_the_tree():
  model = MODELS['dense']
  params = model.init(KEY, X)
  spec = LoraSpec([(r'.*/kernel', qlora.QLora(rank=2)),
                   (r'.*/bias', 'train')])
  qparams = qlora.quantize_params(params, spec)
  paths = dict(lorajax.spec.flatten_paths(qparams))
  assert isinstance(paths['params/fc1/kernel'], quant.Nf4Kernel)
  train, frozen = lorajax.partition(qparams, spec)
  assert set(dict(lorajax.spec.flatten_paths(train))) == {
      'params/fc1/bias', 'params/fc2/bias'}
  assert isinstance(frozen['params']['fc2']['kernel'], quant.Nf4Kernel)
  assert quant.quantized_nbytes(qparams) < quant.quantized_nbytes(params)


# ---- dequantization inside the rewrite -------------------------------------

REWRITE_CASES = ([(m, 'nf4') for m in ('dense', 'multi_axis', 'scan', 'lhs')]
                 + [(m, 'int8') for m in ('multi_axis', 'lhs')])


@pytest.mark.parametrize('name,method', REWRITE_CASES,
                         ids=[f'{m}-{q}' for m, q in REWRITE_CASES])
def test_rewrite_equals_fn_of_dequantized_params(name, method):
  model = MODELS[name]
  params = model.init(KEY, X)
  spec = LoraSpec([(r'.*kernel', qlora.QLora(rank=2, quant=method)),
                   (r'.*', 'freeze')])
  qparams = qlora.quantize_params(params, spec, fn=model.apply, args=(X,))
  dense = quant.dequantize_params(qparams)
  adapters = _randomize(lorajax.init(spec, qparams, KEY, fn=model.apply,
                                     args=(X,)))
  # Frozen base only: x·dequant(W).
  frozen_spec = LoraSpec([(r'.*kernel', qlora.Quantized(method)),
                          (r'.*', 'freeze')])
  base = jax.jit(lorajax.lora(model.apply, frozen_spec))(qparams, None, X)
  _close(base, model.apply(dense, X))
  # QLoRA, forward and gradients, against LoRA on the dequantized base.
  lora_spec = LoraSpec([(r'.*kernel', Lora(rank=2)), (r'.*', 'freeze')])
  fn_q = jax.jit(lorajax.lora(model.apply, spec))
  fn_d = jax.jit(lorajax.lora(model.apply, lora_spec))
  _close(fn_q(qparams, adapters, X), fn_d(dense, adapters, X))
  _close(fn_q(qparams, adapters, X),
         model.apply(lorajax.merge(dense, adapters, lora_spec), X))

  def loss(f, p):
    return lambda ad, x: jnp.sum(jnp.sin(f(p, ad, x)))

  gq = jax.jit(jax.grad(loss(fn_q, qparams), argnums=(0, 1)))(adapters, X)
  gd = jax.jit(jax.grad(loss(fn_d, dense), argnums=(0, 1)))(adapters, X)
  for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gd)):
    _close(a, b, 1e-4)


def test_qlora_on_dense_kernel_asks_to_quantize():
  model = MODELS['dense']
  params = model.init(KEY, X)
  spec = LoraSpec([(r'.*kernel', qlora.QLora(rank=2)), (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, KEY)
  with pytest.raises(ValueError, match='quantize_params'):
    lorajax.lora(model.apply, spec)(params, adapters, X)


def test_quantize_params_errors():
  model = MODELS['scan']
  params = model.init(KEY, X)
  with pytest.raises(ValueError, match='fn= and args='):
    qlora.quantize_params(params, [r'.*kernel'], 'nf4')
  with pytest.raises(ValueError, match='matches no kernel'):
    qlora.quantize_params(params, [r'.*/nothing'], 'nf4')
  with pytest.raises(ValueError, match='method'):
    qlora.Quantized('int4')
  with pytest.raises(ValueError, match='needs method'):
    qlora.quantize_params(params, [r'.*kernel'])


def test_provider_without_params_in_init_and_merge():
  model = MODELS['dense']
  params = model.init(KEY, X)
  spec = LoraSpec([(r'.*/fc1/kernel', Lora(rank=2)),
                   (r'.*/fc2/kernel', qlora.Quantized('int8')),
                   (r'.*', 'freeze')])
  qparams = qlora.quantize_params(params, spec)
  assert qlora.Quantized().param_shapes((8, 4), None) == {}
  adapters = _randomize(lorajax.init(spec, qparams, KEY))
  assert adapters['params']['fc2']['kernel'] == {}
  assert len(jax.tree.leaves(adapters)) == 2
  del adapters['params']['fc2']          # may be omitted, too
  got = lorajax.lora(model.apply, spec)(qparams, adapters, X)
  merged = lorajax.merge(qparams, adapters, spec)
  assert not isinstance(merged['params']['fc2']['kernel'], quant.Int8Kernel)
  _close(got, model.apply(merged, X))


@pytest.mark.parametrize('requantize', [False, True])
def test_merge_into_quantized_base(requantize):
  model = MODELS['dense']
  params = model.init(KEY, X)
  spec = LoraSpec([(r'.*kernel', qlora.QLora(rank=2, quant='int8')),
                   (r'.*', 'freeze')])
  qparams = qlora.quantize_params(params, spec)
  adapters = _randomize(lorajax.init(spec, qparams, KEY))
  merged, did = lorajax.merge_quantized(qparams, adapters, spec,
                                      requantize=requantize)
  assert did == requantize
  kernel = merged['params']['fc1']['kernel']
  want = lorajax.lora(model.apply, spec)(qparams, adapters, X)
  if requantize:
    assert isinstance(kernel, quant.Int8Kernel)
    merged = quant.dequantize_params(merged)
    _close(model.apply(merged, X), want, 2e-2)
  else:
    assert kernel.dtype == jnp.float32 and kernel.shape == (8, 16)
    _close(model.apply(merged, X), want)


# ---- the training step never holds a dense copy of the base ----------------


class Deep(nn.Module):
  """Eight 256x256 kernels: 2 MiB of float32 that dominate the step."""

  @nn.compact
  def __call__(self, x):
    for i in range(8):
      x = jnp.tanh(nn.Dense(256, use_bias=False, name=f'l{i}')(x))
    return x


@pytest.mark.parametrize('method', ['nf4', 'int8'])
def test_step_memory_holds_only_the_quantized_base(method):
  model, x = Deep(), jnp.ones((4, 256))
  params = model.init(KEY, x)
  f32_bytes = 8 * 256 * 256 * 4
  spec = LoraSpec([(r'.*kernel', qlora.QLora(rank=4, quant=method))])
  qparams = qlora.quantize_params(params, spec)
  adapters = lorajax.init(spec, qparams, KEY)
  fn = lorajax.lora(model.apply, spec)

  def step(adapters, qparams, x):
    return jax.grad(lambda ad: jnp.mean(fn(qparams, ad, x) ** 2))(adapters)

  mem = jax.jit(step).lower(adapters, qparams, x).compile().memory_analysis()
  assert mem.argument_size_in_bytes == (quant.quantized_nbytes(qparams)
                                        + quant.quantized_nbytes(adapters)
                                        + x.nbytes)
  # About one dequantized layer at a time, never the 8 of them.
  assert mem.temp_size_in_bytes < f32_bytes / 4

  # The same step on the dequantized tree does hold them: the check can fail.
  lora_spec = LoraSpec([(r'.*kernel', Lora(rank=4))])
  fn_dense = lorajax.lora(model.apply, lora_spec)

  def dense_step(adapters, qparams, x):
    p = quant.dequantize_params(qparams)
    return jax.grad(lambda ad: jnp.mean(fn_dense(p, ad, x) ** 2))(adapters)

  naive = jax.jit(dense_step).lower(adapters, qparams, x).compile()
  assert naive.memory_analysis().temp_size_in_bytes >= f32_bytes
