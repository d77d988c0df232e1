"""LoRA through lorajax's own models: scanned Llama layers, generation, BERT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import Lora, LoraSpec
from lorajax.models import bert
from lorajax.models import llama
from lorajax.models import lm

KEY = jax.random.key(0)


def _randomize(tree, seed=3, scale=0.05):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [scale * jax.random.normal(k, x.shape) for k, x in
                zip(keys, leaves)])


@pytest.mark.parametrize('scan_layers,remat', [(False, False), (True, True)])
def test_llama_lora_matches_merged(scan_layers, remat):
  config = llama.LlamaConfig.tiny(scan_layers=scan_layers, remat=remat)
  model = llama.Llama(config)
  tokens = jax.random.randint(KEY, (2, 12), 0, config.vocab_size)
  params = model.init(KEY, tokens)['params']

  def apply(p, t):
    return model.apply({'params': p}, t)

  spec = LoraSpec([(r'.*/(q_proj|v_proj)/kernel', Lora(rank=4, alpha=8)),
                   (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, KEY, fn=apply, args=(tokens,))
  if scan_layers:
    q = adapters['layers']['attn']['q_proj']['kernel']
    assert q['a'].shape == (config.num_layers, config.hidden_size, 4)
  np.testing.assert_array_equal(lorajax.lora(apply, spec)(params, adapters,
                                                         tokens),
                                apply(params, tokens))
  fn = jax.jit(lorajax.lora(apply, spec))
  adapters = _randomize(adapters)
  want = apply(lorajax.merge(params, adapters, spec), tokens)
  np.testing.assert_allclose(fn(params, adapters, tokens), want,
                             rtol=1e-4, atol=1e-4)


def test_llama_generation_with_adapter_equals_merged():
  config = llama.LlamaConfig.tiny(scan_layers=True)
  model = llama.Llama(config)
  prompt = jax.random.randint(KEY, (2, 5), 0, config.vocab_size)
  params = model.init(KEY, prompt)['params']

  def apply(p, t, **kw):
    return model.apply({'params': p}, t, **kw)

  spec = LoraSpec([(r'.*/(q_proj|v_proj|down_proj)/kernel', Lora(rank=4)),
                   (r'.*', 'freeze')])
  adapters = _randomize(lorajax.init(spec, params, KEY, fn=apply,
                                     args=(prompt,)), scale=0.3)
  adapted = lorajax.lora(apply, spec)
  merged = lorajax.merge(params, adapters, spec)
  with_adapter = lm.generate(
      lambda ps, t, **kw: adapted(ps[0], ps[1], t, **kw),
      (params, adapters), prompt, 6)
  with_merged = lm.generate(apply, merged, prompt, 6)
  base = lm.generate(apply, params, prompt, 6)
  np.testing.assert_array_equal(with_adapter, with_merged)
  assert not np.array_equal(with_adapter, base)


def test_bert_lora_grads_only_for_adapters_and_head():
  config = bert.BertConfig.minilm_l6(num_layers=2, hidden_size=64,
                                     num_heads=4, intermediate_size=128)
  model = bert.Bert(config)
  ids = jax.random.randint(KEY, (2, 10), 0, config.vocab_size)
  params = model.init(KEY, ids)['params']

  def apply(p, ids):
    return model.apply({'params': p}, ids).logits

  spec = LoraSpec([(r'.*/attention/(query|value)/kernel', Lora(rank=4)),
                   (r'classifier/.*', 'train'),
                   (r'.*', 'freeze')])
  adapters = lorajax.init(spec, params, KEY)
  train, frozen = lorajax.partition(params, spec)
  adapted = lorajax.lora(apply, spec)

  def loss(t, frozen):
    return adapted(lorajax.combine(t['params'], frozen), t['adapters'],
                   ids).sum()

  grads = jax.grad(loss)({'adapters': adapters, 'params': train}, frozen)
  assert set(grads['params']) == {'classifier'}
  assert len(jax.tree.leaves(grads['adapters'])) == 2 * 2 * 2
