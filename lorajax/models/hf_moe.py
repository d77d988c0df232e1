"""Hugging Face mixture-of-experts checkpoints (Mixtral, Qwen3-MoE) as
``moe.MoeDecoder``.

``moe_config(hf)`` reads ``config.json`` strictly: what changes the
computation and ``MoeDecoder`` does not implement (dense MLP layers
between the sparse ones: ``decoder_sparse_step`` / ``mlp_only_layers``;
shared experts; router jitter; another activation or rope type; dropout in
attention) raises ``ValueError`` naming the field and its value.

Names. transformers 5 keeps each layer's experts as two 3-D parameters,
``mlp.experts.gate_up_proj`` ``[E, 2f, d]`` (gate rows first) and
``mlp.experts.down_proj`` ``[E, d, f]``, and the router as
``mlp.gate.weight`` ``[E, d]``; ``hf_keys`` gives these names (the ones a
PEFT adapter's keys are made of). ``save_pretrained`` writes the older
per-expert files instead — Mixtral's ``block_sparse_moe.experts.{e}.w1``
(gate), ``w3`` (up), ``w2`` (down) and ``block_sparse_moe.gate``;
Qwen3-MoE's ``mlp.experts.{e}.{gate,up,down}_proj`` — and ``read_moe``
accepts both forms, one tensor at a time.

Example:

  >>> config = moe_config({'model_type': 'mixtral', 'vocab_size': 64,
  ...     'hidden_size': 32, 'num_hidden_layers': 1,
  ...     'num_attention_heads': 4, 'intermediate_size': 16,
  ...     'num_local_experts': 4, 'num_experts_per_tok': 2})
  >>> config.num_experts, config.expert_size, config.norm_topk
  (4, 16, True)
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from lorajax.models import hf_decoders
from lorajax.models import hf_files
from lorajax.models import moe

MOE_TYPES = ('mixtral', 'qwen3_moe')

# Our path inside a layer -> transformers 5's name inside ``layers.{i}``:
# the dense decoders' attention and norms, then the router and experts.
_LAYER = {k: v for k, v in hf_decoders.LAYER_NAMES.items()
          if not k.startswith('mlp/')} | {
              'mlp/gate/kernel': 'mlp.gate.weight',
              'mlp/experts/gate_up_proj/kernel': 'mlp.experts.gate_up_proj',
              'mlp/experts/down_proj/kernel': 'mlp.experts.down_proj'}
# Per-expert file names save_pretrained writes: (module, gate, up, down).
_PER_EXPERT = {'mixtral': ('block_sparse_moe', 'w1', 'w3', 'w2'),
               'qwen3_moe': ('mlp', 'gate_proj', 'up_proj', 'down_proj')}
_BUFFERS = ('rotary_emb.inv_freq',)
_PER_EXPERT_KEY = re.compile(
    r'(?:.+\.)?layers\.\d+\.(?:block_sparse_moe\.(?:gate\.weight|experts\.\d+'
    r'\.w[123]\.weight)|mlp\.experts\.\d+\.(?:gate|up|down)_proj\.weight)')


def _refuse(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f'config.json {field}={value!r}: {why}')


def _rope_base(hf: dict[str, Any]) -> float:
  """The RoPE base; refuses any rope type but ``'default'``."""
  params = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  field = 'rope_parameters' if hf.get('rope_parameters') else 'rope_scaling'
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type != 'default':
    raise _refuse(f'{field}.rope_type', rope_type,
                  "only 'default' RoPE is implemented for MoE decoders")
  partial = params.get('partial_rotary_factor',
                       hf.get('partial_rotary_factor', 1.0))
  if partial not in (None, 1, 1.0):
    raise _refuse('partial_rotary_factor', partial,
                  'RoPE on part of each head is not implemented')
  default = 1e6 if hf.get('model_type') == 'mixtral' else 10000.0
  return float(params.get('rope_theta', hf.get('rope_theta')) or default)


def moe_config(hf: dict[str, Any], **overrides: Any) -> moe.MoeConfig:
  """Builds a ``MoeConfig`` from a Mixtral or Qwen3-MoE ``config.json``.

  Args:
    hf: the parsed ``config.json``.
    **overrides: ``MoeConfig`` fields that win (``dtype``, ``scan_layers``,
      ``remat``).

  Returns:
    The ``MoeConfig``.

  Raises:
    ValueError: naming the field and value of anything not implemented.
  """
  kind = hf.get('model_type')
  if kind not in MOE_TYPES:
    raise _refuse('model_type', kind, f'not a mixture-of-experts decoder '
                  f'lorajax implements; expected one of {MOE_TYPES}')
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise _refuse('hidden_act', act, "only 'silu' (SwiGLU) experts are "
                  'implemented')
  if hf.get('attention_dropout'):
    raise _refuse('attention_dropout', hf['attention_dropout'],
                  'dropout inside attention is not implemented')
  if hf.get('router_jitter_noise'):
    raise _refuse('router_jitter_noise', hf['router_jitter_noise'],
                  'multiplicative router noise in training is not '
                  'implemented')
  for field in ('shared_expert_intermediate_size', 'n_shared_experts',
                'num_shared_experts'):
    if hf.get(field):
      raise _refuse(field, hf[field], 'shared experts are not implemented')
  num_experts = hf.get('num_local_experts', hf.get('num_experts'))
  if not num_experts:
    raise _refuse('num_experts', num_experts, 'a model without experts is '
                  'not a mixture of experts; load it as its dense family')
  heads = hf['num_attention_heads']
  fields = dict(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      intermediate_size=hf['intermediate_size'],
      rope_base=_rope_base(hf),
      max_position=hf.get('max_position_embeddings', 2048),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      num_experts=int(num_experts),
      experts_per_token=int(hf.get('num_experts_per_tok', 2)))
  if kind == 'mixtral':
    fields.update(rms_eps=float(hf.get('rms_norm_eps', 1e-5)),
                  expert_size=hf['intermediate_size'], norm_topk=True,
                  sliding_window=hf.get('sliding_window'))
  else:
    step = hf.get('decoder_sparse_step', 1)
    if step != 1:
      raise _refuse('decoder_sparse_step', step, 'dense MLP layers between '
                    'the sparse ones are not implemented (only 1, every '
                    'layer sparse)')
    if hf.get('mlp_only_layers'):
      raise _refuse('mlp_only_layers', hf['mlp_only_layers'], 'dense MLP '
                    'layers are not implemented (only [])')
    biased = bool(hf.get('attention_bias', False))
    window = hf.get('sliding_window') if hf.get('use_sliding_window') else None
    fields.update(rms_eps=float(hf.get('rms_norm_eps', 1e-6)),
                  expert_size=hf['moe_intermediate_size'],
                  norm_topk=bool(hf.get('norm_topk_prob', False)),
                  qk_norm=True, qkv_bias=biased, out_bias=biased,
                  sliding_window=window)
  return moe.MoeConfig(**(fields | overrides))


def expected_shapes(config: moe.MoeConfig) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the params of an unscanned ``MoeDecoder``."""
  d, hd, e, f = (config.hidden_size, config.head_dim, config.num_experts,
                 config.expert_size)
  q, kv = config.num_heads * hd, config.num_kv_heads * hd
  layer = {'attn_norm/scale': (d,), 'attn/q_proj/kernel': (d, q),
           'attn/k_proj/kernel': (d, kv), 'attn/v_proj/kernel': (d, kv),
           'attn/o_proj/kernel': (q, d), 'mlp_norm/scale': (d,),
           'mlp/gate/kernel': (d, e),
           'mlp/experts/gate_up_proj/kernel': (e, d, 2 * f),
           'mlp/experts/down_proj/kernel': (e, f, d)}
  if config.qkv_bias:
    layer.update({'attn/q_proj/bias': (q,), 'attn/k_proj/bias': (kv,),
                  'attn/v_proj/bias': (kv,)})
  if config.out_bias:
    layer['attn/o_proj/bias'] = (d,)
  if config.qk_norm:
    layer.update({'attn/q_norm/scale': (hd,), 'attn/k_norm/scale': (hd,)})
  out = {'embed/embedding': (config.vocab_size, d), 'final_norm/scale': (d,)}
  if not config.tie_embeddings:
    out['lm_head/kernel'] = (d, config.vocab_size)
  for i in range(config.num_layers):
    out.update({f'layers_{i}/{k}': v for k, v in layer.items()})
  return out


def hf_keys(config: moe.MoeConfig, prefix: str = 'model.') -> dict[str, str]:
  """Our path -> transformers 5's parameter name, for every parameter.

  Expert kernels map to the 3-D parameters (``...mlp.experts.gate_up_proj``,
  stored ``[E, out, in]``: our ``[E, in, out]`` with the last two axes
  swapped); other kernels to ``Linear`` weights (``[out, in]``).
  ``prefix`` is ``'model.'`` for ``*ForCausalLM``, ``''`` for a bare model.
  """
  return hf_decoders.decoder_keys(expected_shapes(config), _LAYER, prefix)


def _expert_tensor(files: hf_files.CheckpointFiles, kind: str, key: str,
                   num_experts: int) -> tuple[np.ndarray, list[str]]:
  """The ``[E, out, in]`` expert tensor of a transformers 5 ``key``, read
  whole or stacked from the per-expert tensors; returns it and the keys
  read."""
  if key in files:
    return files.get(key), [key]
  layer, name = key.rsplit('.mlp.experts.', 1)
  module, gate, up, down = _PER_EXPERT[kind]
  parts = (gate, up) if name == 'gate_up_proj' else (down,)
  names = [[f'{layer}.{module}.experts.{e}.{p}.weight' for p in parts]
           for e in range(num_experts)]
  missing = [n for row in names for n in row if n not in files]
  if missing:
    raise ValueError(f'{files.directory}: no tensor {key!r} and no '
                     f'per-expert tensors for it (e.g. {missing[0]!r} is '
                     'missing)')
  stacked = np.stack([np.concatenate([files.get(n) for n in row], 0)
                      for row in names])
  return stacked, [n for row in names for n in row]


def read_moe(files: hf_files.CheckpointFiles, config: moe.MoeConfig, *,
             prefix: str = 'model.', head: bool = True,
             place: Callable[[str, np.ndarray], Any] = hf_files.host_copy
             ) -> dict[str, Any]:
  """Reads every parameter of ``config`` from ``files``.

  Args:
    files: the checkpoint.
    config: its ``MoeConfig`` (unscanned).
    prefix: ``'model.'`` or ``''`` (bare model).
    head: read ``lm_head.weight`` (False: the base model only).
    place: ``(path, host array) -> array``, called on each tensor as it is
      read (``hf_files.host_copy``).

  Returns:
    ``{path: place(path, array)}`` in stored dtype, kernels ``[in, out]`` (experts
    ``[E, in, out]``).

  Raises:
    ValueError: a missing tensor, a shape that does not fit, a tensor with
      no place in the model, or ``tie_word_embeddings`` contradicted.
  """
  kind = files.config.get('model_type')
  shapes = expected_shapes(config)
  keys = hf_keys(config, prefix)
  if not (head and not config.tie_embeddings):
    keys.pop('lm_head/kernel', None)
  present = set(files.keys())
  if head and not config.tie_embeddings and 'lm_head.weight' not in present:
    raise _refuse('tie_word_embeddings', False,
                  'but the checkpoint has no lm_head.weight')
  if head and config.tie_embeddings and 'lm_head.weight' in present:
    if not np.array_equal(files.get('lm_head.weight'),
                          files.get(f'{prefix}embed_tokens.weight')):
      raise _refuse('tie_word_embeddings', True, 'but the checkpoint has an '
                    'lm_head.weight that differs from the input embeddings')
  used = {'lm_head.weight'}
  flat = {}
  for path, key in keys.items():
    if '.mlp.experts.' in key:
      value, read = _expert_tensor(files, kind, key, config.num_experts)
      used.update(read)
      value = np.swapaxes(value, 1, 2)
    else:
      if key not in present and key.endswith('.mlp.gate.weight'):
        key = key.replace('.mlp.gate.', '.block_sparse_moe.gate.')
      if key not in present:
        raise ValueError(f'{files.directory}: no tensor {key!r} for {path} '
                         f'{shapes[path]}')
      used.add(key)
      value = files.get(key)
      value = value.T if path.endswith('/kernel') else value
    if value.shape != shapes[path]:
      raise ValueError(f'{files.directory}: tensor {key!r} gives {path} the '
                       f'shape {value.shape}, expected {shapes[path]} from '
                       f'config.json')
    flat[path] = place(path, value)
  unknown = sorted(k for k in present - used if not k.endswith(_BUFFERS))
  if unknown:
    raise ValueError(
        f'{files.directory}: {len(unknown)} tensors have no place in a '
        f'{kind} MoeDecoder of this config.json (e.g. {unknown[:4]}); they '
        'are not dropped silently')
  return flat


def key_map(config: moe.MoeConfig, head: str) -> dict[str, str]:
  """``hf_keys`` of the checkpoint of ``head``: ``'causal_lm'`` (keys under
  ``model.``, ``lm_head`` unless tied) or ``'base'`` (the bare model)."""
  if head == 'base':
    return hf_keys(config.replace(tie_embeddings=True, scan_layers=False), '')
  return hf_keys(config.replace(scan_layers=False), 'model.')


def to_torch(path: str, value: np.ndarray) -> np.ndarray:
  """A parameter as transformers 5 stores it: kernels ``[in, out]`` as
  ``[out, in]``, expert kernels ``[E, in, out]`` as ``[E, out, in]``."""
  return np.swapaxes(value, -1, -2) if path.endswith('/kernel') else value


def is_per_expert_key(key: str) -> bool:
  """Whether ``key`` is one of the per-expert or router tensors of
  save_pretrained's files, which ``read_moe`` reads into the 3-D expert
  kernels (an export writes transformers 5's names instead)."""
  return bool(_PER_EXPERT_KEY.fullmatch(key))
