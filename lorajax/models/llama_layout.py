"""Parameter layouts of ``lorajax.models.llama``: shapes, scanned vs not.

``expected_shapes(config)`` lists every parameter path and shape of
``Llama(config)``; ``scan_params`` / ``unscan_params`` convert between the
per-layer layout (``layers_{i}/...``) and the ``nn.scan`` layout
(``layers/...`` with a leading layer axis).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.models.llama import LlamaConfig

PyTree = Any


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Returns ``{'/'-joined path: shape}`` of the params of ``Llama(config)``.

  Paths are relative to the ``'params'`` collection; with ``scan_layers`` the
  layer shapes have a leading ``num_layers`` axis.
  """
  d, hd = config.hidden_size, config.head_dim
  q, kv = config.num_heads * hd, config.num_kv_heads * hd
  f = config.intermediate_size
  layer = {'attn_norm/scale': (d,), 'attn/q_proj/kernel': (d, q),
           'attn/k_proj/kernel': (d, kv), 'attn/v_proj/kernel': (d, kv),
           'attn/o_proj/kernel': (q, d), 'mlp_norm/scale': (d,),
           'mlp/gate_proj/kernel': (d, f), 'mlp/up_proj/kernel': (d, f),
           'mlp/down_proj/kernel': (f, d)}
  if config.fused_proj:  # Phi-3: [q | k | v] and [gate | up] kernels.
    for path in ('attn/q_proj', 'attn/k_proj', 'attn/v_proj', 'mlp/gate_proj',
                 'mlp/up_proj'):
      del layer[f'{path}/kernel']
    layer.update({'attn/qkv_proj/kernel': (d, q + 2 * kv),
                  'mlp/gate_up_proj/kernel': (d, 2 * f)})
  if config.sandwich_norms:
    layer.update({'attn_out_norm/scale': (d,), 'mlp_out_norm/scale': (d,)})
  if config.qkv_bias:
    layer.update({'attn/q_proj/bias': (q,), 'attn/k_proj/bias': (kv,),
                  'attn/v_proj/bias': (kv,)})
  if config.out_bias:
    layer['attn/o_proj/bias'] = (d,)
  if config.mlp_bias:
    layer.update({'mlp/gate_proj/bias': (f,), 'mlp/up_proj/bias': (f,),
                  'mlp/down_proj/bias': (d,)})
  if config.qk_norm:
    layer.update({'attn/q_norm/scale': (hd,), 'attn/k_norm/scale': (hd,)})
  out = {'embed/embedding': (config.vocab_size, d), 'final_norm/scale': (d,)}
  if not config.tie_embeddings:
    out['lm_head/kernel'] = (d, config.vocab_size)
  if config.scan_layers:
    out.update({f'layers/{k}': (config.num_layers, *v)
                for k, v in layer.items()})
  else:
    for i in range(config.num_layers):
      out.update({f'layers_{i}/{k}': v for k, v in layer.items()})
  return out


_LAYER_KEY = re.compile(r'layers_(\d+)')


def _split_variables(tree: PyTree) -> tuple[PyTree, bool]:
  if isinstance(tree, dict) and set(tree) == {'params'}:
    return tree['params'], True
  return tree, False


def scan_params(params: PyTree) -> PyTree:
  """Converts ``layers_{i}/...`` params to the scanned ``layers/...`` layout.

  Args:
    params: a variables dict ``{'params': ...}`` or the bare params tree of an
      unscanned ``Llama``.

  Returns:
    The same structure with the layer subtrees stacked along a new axis 0.
  """
  tree, wrapped = _split_variables(params)
  indices = sorted(int(m.group(1)) for k in tree
                   if (m := _LAYER_KEY.fullmatch(k)))
  if not indices or indices != list(range(len(indices))):
    raise ValueError(f'expected keys layers_0..layers_{{L-1}}, got '
                     f'{sorted(tree)}')
  out = {k: v for k, v in tree.items() if not _LAYER_KEY.fullmatch(k)}
  out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[tree[f'layers_{i}'] for i in indices])
  return {'params': out} if wrapped else out


def unscan_params(params: PyTree) -> PyTree:
  """Converts the scanned ``layers/...`` layout to ``layers_{i}/...``.

  Args:
    params: a variables dict ``{'params': ...}`` or the bare params tree of a
      scanned ``Llama``.

  Returns:
    The same structure with ``layers`` split into ``layers_0`` ..
    ``layers_{L-1}``.
  """
  tree, wrapped = _split_variables(params)
  if 'layers' not in tree:
    raise ValueError(f'expected a "layers" key, got {sorted(tree)}')
  stacked = tree['layers']
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in tree.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {'params': out} if wrapped else out
