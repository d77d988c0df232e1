"""Tiny models and helpers shared by the method tests (DoRA, QLoRA, ...)."""

import importlib.util
import os

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (4, 8))


def perturb(tree, seed=7, scale=0.3):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
  return jax.tree_util.tree_unflatten(
      treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                for k, x in zip(keys, leaves)])


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name='fc1')(x))
    return nn.Dense(4, name='fc2')(x)


class Heads(nn.Module):
  """Multi-axis kernels: query [8, 2, 4] and out [2, 4, 8]."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((2, 4), name='query')(x)
    return nn.DenseGeneral(8, axis=(-2, -1), name='out')(jnp.tanh(q))


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(8, name='dense')(jnp.tanh(x)), None


class Scanned(nn.Module):
  """Three layers stacked by nn.scan: kernel [3, 8, 8]."""

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={'params': 0},
                    split_rngs={'params': True}, length=3)
    return stack(name='layers')(x, None)[0]


class LhsDot(nn.Module):
  """The kernel is the left operand of the dot_general."""

  @nn.compact
  def __call__(self, x):
    w = self.param('kernel', nn.initializers.lecun_normal(), (8, 6))
    return lax.dot_general(w, x, (((0,), (1,)), ((), ()))).T  # [B, 6]


MODELS = {'dense': Mlp(), 'multi_axis': Heads(), 'scan': Scanned(),
          'lhs': LhsDot()}


def assert_close(got, want, tol=1e-5):
  """allclose with an absolute tolerance relative to the largest value."""
  scale = float(np.abs(np.asarray(want)).max()) or 1.0
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol,
                             atol=tol * scale)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg='smoke', **overrides):
  """``configs/<name>.py``'s ``get_config(arg)`` with dotted overrides."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  with config.unlocked():
    set_fields(config, overrides)
  return config


def set_fields(config, fields):
  """Sets dotted ``{'lora.rank': 4}`` fields of a ConfigDict in place."""
  for key, value in fields.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_qwen2_dir(directory, **tokenizer_config):
  """Writes a tiny random Qwen2ForCausalLM (transformers' save_pretrained)
  with SmolLM2's BPE tokenizer beside it, into ``directory``.

  ``tokenizer_config`` goes into ``tokenizer_config.json`` with the EOS
  token; without a ``chat_template`` the GGUF's own template is written.
  """
  import json  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lorajax import assets  # pylint: disable=g-import-not-at-top
  from lorajax.models import bpe_tokenizer  # pylint: disable=g-import-not-at-top
  from lorajax.models import llama_loading  # pylint: disable=g-import-not-at-top
  reader = llama_loading.as_reader(
      assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
  tok = bpe_tokenizer.gguf_tokenizer(reader)
  eos = bpe_tokenizer.gguf_special_ids(reader)['eos']
  torch.manual_seed(0)
  config = transformers.Qwen2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=64,
      vocab_size=tok.get_vocab_size(), eos_token_id=eos,
      tie_word_embeddings=True)
  transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
  tok.save(str(directory / 'tokenizer.json'))
  tokenizer_config.setdefault('chat_template',
                              bpe_tokenizer.gguf_chat_template(reader))
  (directory / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': tok.id_to_token(eos), **tokenizer_config}))
  return directory


def tiny_distilbert_dir(directory, num_labels=2):
  """Writes a tiny random ``DistilBertForSequenceClassification`` (d 32, 2
  layers) with a WordPiece ``tokenizer.json`` trained on a few movie-review
  words beside it, into ``directory``; returns the transformers model."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import implementations  # pylint: disable=g-import-not-at-top
  words = ('the a movie film good bad great boring fun dull plot actor '
           'story is was not very and of').split()
  tok = implementations.BertWordPieceTokenizer(lowercase=True)
  tok.train_from_iterator([' '.join(words)] * 10, vocab_size=120,
                          min_frequency=1)
  tok.save(str(directory / 'tokenizer.json'))
  torch.manual_seed(0)
  config = transformers.DistilBertConfig(
      vocab_size=tok.get_vocab_size(), dim=32, n_layers=2, n_heads=4,
      hidden_dim=37, max_position_embeddings=128, num_labels=num_labels)
  model = transformers.DistilBertForSequenceClassification(config).eval()
  model.save_pretrained(directory)
  return model
