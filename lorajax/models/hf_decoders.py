"""Hugging Face decoder checkpoints (Llama, Mistral, Qwen2, Qwen3, Gemma,
Gemma2, Phi-3) as ``Llama``.

The families are one Flax module, ``lorajax.models.llama.Llama``, with
``LlamaConfig`` fields for what differs: Qwen2 has biases on q/k/v, Qwen3
RMS-normalizes each query and key head, Mistral attends within a sliding
window, Llama 3.1 rescales its RoPE frequencies (``rope_type: llama3``);
Gemma scales its embeddings by ``sqrt(d)``, multiplies by ``1 + weight`` in
its RMSNorms and gates with GELU (tanh); Gemma2 adds soft-capping, a query
scale, norms after attention and MLP and a window on every other layer;
Phi-3 fuses ``qkv_proj`` and ``gate_up_proj`` (kept fused, as PEFT sees
them) and may rotate part of each head.

``decoder_config(hf)`` reads ``config.json`` strictly: a value that changes
the computation and is not implemented for the family (another rope type,
a partial rotary factor outside Phi-3, soft-capping outside Gemma2, an
activation, sliding windows on some layers only outside Gemma2, dropout,
bidirectional attention) raises ``ValueError`` naming the field and its
value, and a model type that is not one of ``DECODER_TYPES`` is refused by
name. ``read_decoder`` maps the tensors one at a time and refuses any
tensor it has no place for, and a ``tie_word_embeddings`` that the tensors
contradict.

Example:

  >>> config = decoder_config({'model_type': 'qwen2', 'vocab_size': 64,
  ...     'hidden_size': 32, 'num_hidden_layers': 1,
  ...     'num_attention_heads': 4, 'intermediate_size': 64,
  ...     'rope_parameters': {'rope_theta': 1e6, 'rope_type': 'default'}})
  >>> config.qkv_bias, config.rope_base, config.head_dim
  (True, 1000000.0, 8)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lorajax.models import hf_files
from lorajax.models import llama
from lorajax.models import llama_layout

PyTree = Any

# model_type -> what its attention does beyond Llama's.
DECODER_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2',
                 'phi3')
# Families transformers has that this module does not compute (yet).
REFUSED_TYPES = {
    'gemma3': 'alternating local/global attention, q/k norms, two RoPE bases',
    'gemma3_text': 'alternating local/global attention, q/k norms, two RoPE '
                   'bases',
    'phi': 'parallel attention/MLP with LayerNorm and partial RoPE',
    'mixtral': 'a mixture of experts: models.moe, which lorajax.models.load picks',
    'qwen2_moe': 'mixture-of-experts MLP',
    'qwen3_moe': 'a mixture of experts: models.moe, which lorajax.models.load picks',
    'olmoe': 'mixture-of-experts MLP',
    'deepseek_v3': 'multi-head latent attention and experts',
}

# Our path inside a layer -> Hugging Face name inside ``layers.{i}`` (the
# MoE families' reader takes its attention and norm entries).
LAYER_NAMES = {
    'attn_norm/scale': 'input_layernorm.weight',
    'attn/q_proj/kernel': 'self_attn.q_proj.weight',
    'attn/q_proj/bias': 'self_attn.q_proj.bias',
    'attn/k_proj/kernel': 'self_attn.k_proj.weight',
    'attn/k_proj/bias': 'self_attn.k_proj.bias',
    'attn/v_proj/kernel': 'self_attn.v_proj.weight',
    'attn/v_proj/bias': 'self_attn.v_proj.bias',
    'attn/o_proj/kernel': 'self_attn.o_proj.weight',
    'attn/o_proj/bias': 'self_attn.o_proj.bias',
    'attn/q_norm/scale': 'self_attn.q_norm.weight',
    'attn/k_norm/scale': 'self_attn.k_norm.weight',
    'mlp_norm/scale': 'post_attention_layernorm.weight',
    'mlp/gate_proj/kernel': 'mlp.gate_proj.weight',
    'mlp/gate_proj/bias': 'mlp.gate_proj.bias',
    'mlp/up_proj/kernel': 'mlp.up_proj.weight',
    'mlp/up_proj/bias': 'mlp.up_proj.bias',
    'mlp/down_proj/kernel': 'mlp.down_proj.weight',
    'mlp/down_proj/bias': 'mlp.down_proj.bias',
}
# Phi-3's fused kernels and Gemma2's norms around attention and MLP (its
# post_attention_layernorm is on the attention output, not before the MLP).
_FUSED = {'attn/qkv_proj/kernel': 'self_attn.qkv_proj.weight',
          'mlp/gate_up_proj/kernel': 'mlp.gate_up_proj.weight'}
_SANDWICH = {'attn_out_norm/scale': 'post_attention_layernorm.weight',
             'mlp_norm/scale': 'pre_feedforward_layernorm.weight',
             'mlp_out_norm/scale': 'post_feedforward_layernorm.weight'}
# Keys transformers may store that are buffers, not parameters.
_BUFFERS = ('rotary_emb.inv_freq',)
# What transformers' config classes assume for a field config.json lacks,
# where it differs from the Llama-like defaults read below.
_GEMMA_DEFAULTS = {'head_dim': 256, 'tie_word_embeddings': True,
                   'rms_norm_eps': 1e-6}
_FAMILY_DEFAULTS = {
    'gemma': _GEMMA_DEFAULTS | {'hidden_act': 'gelu_pytorch_tanh'},
    'gemma2': _GEMMA_DEFAULTS | {
        'hidden_activation': 'gelu_pytorch_tanh', 'query_pre_attn_scalar': 256,
        'sliding_window': 4096, 'attn_logit_softcapping': 50.0,
        'final_logit_softcapping': 30.0},
    'phi3': {'rms_norm_eps': 1e-5},
}
# transformers' activation name -> LlamaConfig.activation.
_ACTIVATIONS = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh',
                'gelu': 'gelu'}


def _refuse(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f'config.json {field}={value!r}: {why}')


def _rope(hf: dict[str, Any], model_type: str
          ) -> tuple[float, llama.Llama3Rope | None, float]:
  """The RoPE base, scaling and partial rotary factor (Phi-3 only) of
  ``rope_parameters`` / legacy fields."""
  params = hf.get('rope_parameters')
  field = 'rope_parameters'
  if not params and hf.get('rope_scaling'):
    params, field = hf['rope_scaling'], 'rope_scaling'
  params = dict(params or {})
  if params and not ({'rope_type', 'type', 'rope_theta', 'factor'}
                     & set(params)):
    raise _refuse(field, params, 'RoPE parameters per layer type are not '
                  'implemented')
  theta = params.get('rope_theta', hf.get('rope_theta')) or 10000.0
  partial = params.get('partial_rotary_factor',
                       hf.get('partial_rotary_factor', 1.0))
  partial = 1.0 if partial is None else float(partial)
  if partial != 1 and model_type != 'phi3':
    raise _refuse('partial_rotary_factor', partial, 'RoPE on part of each '
                  f'head is implemented for phi3, not {model_type}')
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type == 'default':
    return float(theta), None, partial
  if rope_type == 'llama3' and model_type != 'phi3':
    return float(theta), llama.Llama3Rope(
        factor=float(params['factor']),
        low_freq_factor=float(params['low_freq_factor']),
        high_freq_factor=float(params['high_freq_factor']),
        original_max_position=int(params.get(
            'original_max_position_embeddings',
            hf.get('max_position_embeddings', 2048)))), partial
  known = "'default'" if model_type == 'phi3' else "'default' and 'llama3'"
  raise _refuse(f'{field}.rope_type', rope_type,
                f'only {known} RoPE is implemented for {model_type}')


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
  """The window every layer uses, or None; refuses per-layer windows."""
  if model_type in ('mistral', 'phi3'):
    # Every layer uses the window (transformers' Mistral ignores
    # layer_types; 'ministral' is the model type that alternates).
    window = hf.get('sliding_window')
    return None if window is None else int(window)
  if model_type in ('qwen2', 'qwen3'):
    window = hf.get('sliding_window') if hf.get('use_sliding_window') else None
    types = hf.get('layer_types')
    if types is None:
      start = hf.get('max_window_layers', 28)
      types = ['sliding_attention' if window is not None and i >= start
               else 'full_attention' for i in range(hf['num_hidden_layers'])]
    if set(types) == {'full_attention'}:
      return None
    if set(types) == {'sliding_attention'} and window is not None:
      return int(window)
    raise _refuse('layer_types', types, f'sliding_window={window} on some '
                  'layers only (or without a window) is not implemented')
  return None


def _gemma2_layers(hf: dict[str, Any]
                   ) -> tuple[int | None, tuple[bool, ...] | None]:
  """Gemma2's ``(sliding_window, sliding_layers)`` from ``layer_types``.

  Without ``layer_types`` the even layers (0, 2, ...) use the window, as
  transformers assumes.
  """
  n = hf['num_hidden_layers']
  types = hf.get('layer_types') or [
      'sliding_attention' if i % 2 == 0 else 'full_attention'
      for i in range(n)]
  if len(types) != n or set(types) - {'sliding_attention', 'full_attention'}:
    raise _refuse('layer_types', types, f'expected {n} entries of '
                  "'sliding_attention' / 'full_attention'")
  sliding = tuple(t == 'sliding_attention' for t in types)
  window = hf.get('sliding_window')
  if not any(sliding):
    return None, None
  if window is None:
    raise _refuse('sliding_window', None, f'but layer_types={types} asks '
                  'for sliding-window layers')
  return int(window), None if all(sliding) else sliding


def _activation(hf: dict[str, Any], model_type: str) -> str:
  """``LlamaConfig.activation`` from the field the family's MLP reads."""
  field = 'hidden_activation' if model_type == 'gemma2' else 'hidden_act'
  act = hf.get(field, 'silu')
  if model_type == 'gemma' and act == 'gelu':  # transformers reads it so.
    act = 'gelu_pytorch_tanh'
  known = (_ACTIVATIONS if model_type in ('gemma', 'gemma2', 'phi3')
           else {'silu': 'silu'})
  if act not in known:
    raise _refuse(field, act, f'the implemented activations are '
                  f'{tuple(known)}')
  return known[act]


def _family_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
  """The ``LlamaConfig`` fields that only Gemma, Gemma2 and Phi-3 set."""
  if model_type in ('gemma', 'gemma2'):
    if hf.get('use_bidirectional_attention'):
      raise _refuse('use_bidirectional_attention',
                    hf['use_bidirectional_attention'],
                    'only causal attention is implemented')
    fields = dict(norm_offset=1.0, scale_embeddings=True)
    if model_type == 'gemma2':
      window, layers = _gemma2_layers(hf)
      fields.update(
          sandwich_norms=True, sliding_window=window, sliding_layers=layers,
          query_scale=float(hf['query_pre_attn_scalar']) ** -0.5,
          attn_softcap=hf.get('attn_logit_softcapping'),
          final_softcap=hf.get('final_logit_softcapping'))
    return fields
  if model_type == 'phi3':
    for field in ('resid_pdrop', 'embd_pdrop'):
      if hf.get(field):
        raise _refuse(field, hf[field], 'dropout is not implemented')
    return dict(fused_proj=True)
  return {}


def decoder_config(hf: dict[str, Any], **overrides: Any) -> llama.LlamaConfig:
  """Builds a ``LlamaConfig`` from a decoder's ``config.json`` dict.

  Args:
    hf: the parsed ``config.json``; ``model_type`` picks the family
      (``'llama'`` if absent).
    **overrides: ``LlamaConfig`` fields that win (``dtype``,
      ``scan_layers``, ``remat``).

  Raises:
    ValueError: naming the field and value of anything not implemented.
  """
  model_type = hf.get('model_type', 'llama')
  if model_type in REFUSED_TYPES:
    raise _refuse('model_type', model_type, 'not implemented ('
                  f'{REFUSED_TYPES[model_type]}); lorajax loads '
                  f'{DECODER_TYPES} decoders')
  if model_type not in DECODER_TYPES:
    raise _refuse('model_type', model_type,
                  f'not a decoder lorajax knows; expected one of '
                  f'{DECODER_TYPES}')
  hf = _FAMILY_DEFAULTS.get(model_type, {}) | hf
  activation = _activation(hf, model_type)
  for field in ('attn_logit_softcapping', 'final_logit_softcapping'):
    if hf.get(field) is not None and model_type != 'gemma2':
      raise _refuse(field, hf[field], f'soft-capping is implemented for '
                    f'gemma2, not {model_type}')
  if hf.get('attention_dropout'):
    raise _refuse('attention_dropout', hf['attention_dropout'],
                  'dropout inside attention is not implemented')
  if hf.get('is_encoder_decoder') or hf.get('cross_attention_hidden_size'):
    raise _refuse('is_encoder_decoder', True, 'not a decoder-only model')
  rope_base, rope_scaling, partial = _rope(hf, model_type)
  heads = hf['num_attention_heads']
  default_head_dim = 128 if model_type == 'qwen3' else hf['hidden_size'] // heads
  head_dim = hf.get('head_dim') or default_head_dim
  rope_dim = None
  if partial != 1:  # Phi-3 rotates the first int(head_dim * factor) channels.
    rope_dim = int(head_dim * partial)
    if rope_dim % 2 or rope_dim <= 0:
      raise _refuse('partial_rotary_factor', partial, f'rotates {rope_dim} '
                    f'of head_dim={head_dim} channels; an even, positive '
                    'number is implemented')
  biased = bool(hf.get('attention_bias', False))
  gemma = model_type in ('gemma', 'gemma2')
  fields = dict(
      vocab_size=hf['vocab_size'],
      hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'],
      num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=head_dim,
      rope_dim=rope_dim,
      activation=activation,
      intermediate_size=hf['intermediate_size'],
      rope_base=rope_base,
      rope_scaling=rope_scaling,
      rms_eps=float(hf.get('rms_norm_eps', 1e-6)),
      max_position=hf.get('max_position_embeddings', 2048),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      # What each family's attention and MLP carry (transformers' modeling
      # code, not the config, fixes Qwen2's biases and Mistral's none).
      qkv_bias=model_type == 'qwen2' or (
          biased and (model_type in ('llama', 'qwen3') or gemma)),
      out_bias=biased and (model_type in ('llama', 'qwen3') or gemma),
      mlp_bias=bool(hf.get('mlp_bias', False)) and model_type == 'llama',
      qk_norm=model_type == 'qwen3',
      sliding_window=_sliding_window(hf, model_type))
  fields.update(_family_fields(hf, model_type))
  return llama.LlamaConfig(**(fields | overrides))


def hf_keys(config: llama.LlamaConfig, prefix: str = 'model.'
            ) -> dict[str, str]:
  """Our path -> Hugging Face key of every parameter of ``config``.

  ``prefix`` is ``'model.'`` for ``*ForCausalLM`` and ``''`` for a bare
  ``*Model`` checkpoint (which has no ``lm_head``).
  """
  shapes = llama_layout.expected_shapes(config.replace(scan_layers=False))
  layer_names = (LAYER_NAMES | _FUSED
                 | (_SANDWICH if config.sandwich_norms else {}))
  return decoder_keys(shapes, layer_names, prefix)


def decoder_keys(paths: Any, layer_names: dict[str, str],
                 prefix: str) -> dict[str, str]:
  """Our unscanned decoder paths -> Hugging Face keys: embeddings, final
  norm and ``lm_head`` by name, ``layers_{i}/<rest>`` by ``layer_names``
  inside ``{prefix}layers.{i}`` (shared by the dense and MoE readers)."""
  keys = {}
  for path in paths:
    if path == 'embed/embedding':
      keys[path] = f'{prefix}embed_tokens.weight'
    elif path == 'final_norm/scale':
      keys[path] = f'{prefix}norm.weight'
    elif path == 'lm_head/kernel':
      keys[path] = 'lm_head.weight'
    else:
      layer, rest = path.split('/', 1)
      keys[path] = (f'{prefix}layers.{layer.split("_")[1]}.'
                    f'{layer_names[rest]}')
  return keys


def read_decoder(files: hf_files.CheckpointFiles, config: llama.LlamaConfig,
                 *, prefix: str = 'model.', head: bool = True,
                 place: Callable[[str, np.ndarray], Any] = hf_files.host_copy
                 ) -> dict[str, Any]:
  """Reads every parameter of ``config`` from ``files``, one at a time.

  ``head=False`` reads the base model only (``lm_head.weight`` unused).
  ``place(path, host array)`` is called on each tensor as it is read.

  Returns:
    ``{path: place(path, array)}`` (unscanned paths, stored dtype, kernels
    ``[in, out]``).

  Raises:
    ValueError: a missing tensor, a shape that does not fit, a tensor with
      no place in the model, or ``tie_word_embeddings`` contradicted.
  """
  shapes = llama_layout.expected_shapes(config.replace(scan_layers=False))
  keys = hf_keys(config, prefix)
  present = set(files.keys())
  if head and config.tie_embeddings and 'lm_head.weight' in present:
    head = files.get('lm_head.weight')
    if not np.array_equal(head, files.get(f'{prefix}embed_tokens.weight')):
      raise _refuse('tie_word_embeddings', True, 'but the checkpoint has an '
                    'lm_head.weight that differs from the input embeddings')
  if head and not config.tie_embeddings and 'lm_head.weight' not in present:
    raise _refuse('tie_word_embeddings', False,
                  'but the checkpoint has no lm_head.weight')
  unknown = sorted(k for k in present - set(keys.values()) - {'lm_head.weight'}
                   if not k.endswith(_BUFFERS))
  if unknown:
    raise ValueError(
        f'{files.directory}: {len(unknown)} tensors have no place in '
        f'{config.__class__.__name__}(qkv_bias={config.qkv_bias}, '
        f'out_bias={config.out_bias}, mlp_bias={config.mlp_bias}, '
        f'qk_norm={config.qk_norm}), e.g. {unknown[:4]}; a bias or norm '
        'config.json does not declare is not loaded silently')
  flat = {}
  for path, key in keys.items():
    if key not in present:
      raise ValueError(f'{files.directory}: no tensor {key!r} for {path} '
                       f'{shapes[path]}')
    value = files.get(key)
    if path.endswith('/kernel'):
      value = value.T
    if value.shape != shapes[path]:
      want = shapes[path][::-1] if path.endswith('/kernel') else shapes[path]
      raise ValueError(f'{files.directory}: tensor {key!r} has shape '
                       f'{files.shape(key)}, expected {want} from '
                       f'config.json (for {path})')
    flat[path] = place(path, value)
  return flat
