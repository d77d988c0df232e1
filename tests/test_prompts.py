"""Prompt tuning and prefix tuning on lorajax's BERT and Llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import Lora, LoraSpec
from lorajax.methods import prompts
from lorajax.models import bert
from lorajax.models import llama
from lorajax.models import llama_layout

KEY = jax.random.key(0)
BERT = bert.BertConfig(vocab_size=40, hidden_size=16, num_layers=2,
                       num_heads=2, intermediate_size=32, max_position=32)
LLAMA = llama.LlamaConfig.tiny()


def _close(got, want, tol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol,
                             atol=tol)


def _jit(model):
  return jax.jit(model.apply, static_argnames=('cache_len',))


def _empty(config, layers, kv_heads):
  return {'prompt': jnp.zeros((0, config.hidden_size)),
          'prefix': jnp.zeros((layers, 2, 0, kv_heads, config.head_dim))}


def test_bert_empty_prompt_and_prefix_equal_the_base():
  model = bert.Bert(BERT)
  ids = jax.random.randint(KEY, (2, 6), 0, 40)
  variables = jax.jit(model.init)(KEY, ids)
  apply = _jit(model)
  out = apply(variables, ids, **prompts.model_inputs(_empty(BERT, 2, 2)))
  _close(out.logits, apply(variables, ids).logits, 1e-6)


def test_bert_virtual_tokens_are_masked_like_real_ones():
  model = bert.Bert(BERT)
  ids = jax.random.randint(KEY, (1, 5), 0, 40)
  variables = jax.jit(model.init)(KEY, ids)
  apply = _jit(model)
  p = prompts.for_bert(BERT, KEY, n_prompt=3, n_prefix=2)
  kw = prompts.model_inputs(p)
  alone = apply(variables, ids, **kw)
  # The same sentence padded in a batch: padding is invisible, virtual
  # tokens are not, and the outputs cover the real tokens only.
  padded = jnp.concatenate([ids, jnp.zeros((1, 3), ids.dtype)], 1)
  mask = jnp.array([[1] * 5 + [0] * 3])
  out = apply(variables, padded, mask, **kw)
  assert out.hidden.shape == (1, 8, BERT.hidden_size)
  _close(out.logits, alone.logits)
  _close(out.hidden[:, :5], alone.hidden)
  assert not np.allclose(alone.logits, apply(variables, ids).logits)


def test_bert_rejects_bad_shapes():
  model = bert.Bert(BERT)
  ids = jnp.ones((1, 4), jnp.int32)
  variables = jax.jit(model.init)(KEY, ids)
  with pytest.raises(ValueError, match='prefix has shape'):
    model.apply(variables, ids, prefix=jnp.zeros((2, 2, 3, 16)))
  with pytest.raises(ValueError, match='max_position'):
    model.apply(variables, ids, prompt=jnp.zeros((30, 16)))


def test_prefix_mlp_folds_into_the_prefix():
  p = prompts.for_llama(LLAMA, KEY, n_prefix=4, mlp_hidden=16)
  assert set(p) == {'prefix_mlp'}
  folded = prompts.fold(p)
  assert folded['prefix'].shape == (2, 2, 4, 2, 8)
  _close(prompts.model_inputs(folded)['prefix'],
         prompts.model_inputs(p)['prefix'])
  with pytest.raises(ValueError, match='expected'):
    prompts.model_inputs({'prompt': 1, 'soft': 2})


def _llama(scan=False):
  cfg = LLAMA.replace(scan_layers=scan)
  model = llama.Llama(cfg)
  tokens = jax.random.randint(KEY, (2, 6), 0, LLAMA.vocab_size)
  params = jax.jit(model.init)(KEY, tokens)['params']
  return model, {'params': params}, tokens


def test_llama_empty_prompt_and_prefix_equal_the_base():
  model, variables, tokens = _llama()
  apply = _jit(model)
  got = apply(variables, tokens, **prompts.model_inputs(_empty(LLAMA, 2, 2)))
  _close(got, apply(variables, tokens), 1e-6)


def test_llama_prompt_and_prefix_with_padding_scan_and_cache():
  model, variables, tokens = _llama()
  kw = prompts.model_inputs(prompts.for_llama(
      LLAMA, KEY, n_prompt=3, n_prefix=2,
      embedding=variables['params']['embed']['embedding']))
  apply = _jit(model)
  full = apply(variables, tokens, **kw)
  assert full.shape == (2, 6, LLAMA.vocab_size)
  # Left padding is invisible next to the virtual tokens.
  padded = jnp.concatenate([jnp.zeros((2, 2), tokens.dtype), tokens], 1)
  mask = jnp.concatenate([jnp.zeros((2, 2)), jnp.ones((2, 6))], 1)
  _close(apply(variables, padded, attention_mask=mask, **kw)[:, 2:],
         full, 1e-4)
  # Scanned layers take the stacked prefix.
  scanned = llama.Llama(LLAMA.replace(scan_layers=True))
  _close(_jit(scanned)({'params': llama_layout.scan_params(variables['params'])},
                       tokens, **kw), full, 1e-5)
  # Prefill with the prompt, then decode with the prefix: as one pass.
  logits, cache = apply(variables, tokens[:, :5], cache_len=10, **kw)
  step, _ = apply(variables, tokens[:, 5:], cache=cache, prefix=kw['prefix'])
  _close(logits, full[:, :5], 1e-5)
  _close(step, full[:, 5:], 1e-4)
  with pytest.raises(ValueError, match='cannot extend a cache'):
    model.apply(variables, tokens[:, 5:], cache=cache, **kw)


def test_prompts_train_next_to_adapters():
  model, variables, tokens = _llama()
  spec = LoraSpec([(r'.*/q_proj/kernel', Lora(rank=2)), (r'.*', 'freeze')])
  trainable = {'adapters': lorajax.init(spec, variables, KEY),
               'prompts': prompts.for_llama(LLAMA, KEY, n_prompt=2,
                                            n_prefix=2, mlp_hidden=4)}
  fn = lorajax.lora(model.apply, spec)

  def loss(trainable):
    logits = fn(variables, trainable['adapters'], tokens,
                **prompts.model_inputs(trainable['prompts']))
    return jnp.mean(logits ** 2)

  grads = jax.jit(jax.grad(loss))(trainable)
  for path, g in lorajax.spec.flatten_paths(grads['prompts']):
    assert np.any(np.asarray(g) != 0), path
