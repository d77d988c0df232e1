"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE) against transformers.

transformers writes tiny random checkpoints with ``save_pretrained`` (its
per-expert file format) and is the peer: ``lorajax.models.load`` must give
its logits (float32, |Δ| <= 1e-4·(1 + |logit|)) and its greedy ``generate``
tokens. LoRA on the expert kernels gives one adapter per expert; a config
value lorajax does not implement is refused by name.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorajax
import lorajax.models
from lorajax.models import hf_moe
from lorajax.models import lm
from lorajax.models import moe

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, initializer_range=0.2,
            num_experts_per_tok=2)
CASES = {
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM',
                dict(intermediate_size=24, num_local_experts=4)),
    'mixtral_window': ('MixtralConfig', 'MixtralForCausalLM',
                       dict(intermediate_size=24, num_local_experts=4,
                            sliding_window=4)),
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM',
                  dict(intermediate_size=64, moe_intermediate_size=16,
                       num_experts=4, norm_topk_prob=True)),
    'qwen3_moe_unnormed': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM',
                           dict(intermediate_size=64, moe_intermediate_size=16,
                                num_experts=5, num_experts_per_tok=3,
                                norm_topk_prob=False, attention_bias=True)),
}


def _save(directory, config_cls, model_cls, **fields):
  """Writes a random checkpoint (norms and biases perturbed) and returns
  the float32 transformers model."""
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**(BASE | fields))
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.add_(torch.randn_like(p) * 0.3)
  model.save_pretrained(directory)
  return model


def _ids(shape, vocab=97, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape)


def _assert_logits_close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  tol = 1e-4 * (1 + np.abs(want))
  assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want))


@pytest.mark.parametrize('name', sorted(CASES))
def test_logits_match_transformers(tmp_path, name):
  peer = _save(tmp_path, *CASES[name][:2], **CASES[name][2])
  ids = _ids((2, 11))
  with torch.no_grad():
    want = peer(torch.tensor(ids)).logits.numpy()
  model = lorajax.models.load(tmp_path)
  assert isinstance(model.module, moe.MoeDecoder)
  assert model.architecture == CASES[name][1]
  _assert_logits_close(model.apply(model.params, jnp.asarray(ids)), want)


def test_bare_model_hidden_states_match_transformers(tmp_path):
  torch.manual_seed(0)
  fields = BASE | CASES['qwen3_moe'][2]
  config = transformers.Qwen3MoeConfig(**fields)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  peer = transformers.Qwen3MoeModel(config).eval()
  peer.save_pretrained(tmp_path)
  ids = _ids((2, 9), seed=3)
  with torch.no_grad():
    want = peer(torch.tensor(ids)).last_hidden_state.numpy()
  model = lorajax.models.load(tmp_path)
  assert model.head == 'base'
  _assert_logits_close(model.apply(model.params, jnp.asarray(ids)), want)


@pytest.mark.parametrize('name', ['mixtral_window', 'qwen3_moe'])
def test_greedy_generation_with_cache_matches_transformers(tmp_path, name):
  peer = _save(tmp_path, *CASES[name][:2], **CASES[name][2])
  prompt = _ids((1, 6), seed=5)
  peer.generation_config.eos_token_id = None
  with torch.no_grad():
    want = peer.generate(torch.tensor(prompt), max_new_tokens=12,
                         do_sample=False, pad_token_id=0)[0, 6:].numpy()
  model = lorajax.models.load(tmp_path)
  apply = lambda p, *a, **k: model.module.apply({'params': p}, *a, **k)  # pylint: disable=unnecessary-lambda-assignment
  got = lm.generate(apply, model.params, jnp.asarray(prompt), 12)
  np.testing.assert_array_equal(np.asarray(got)[0], want)
