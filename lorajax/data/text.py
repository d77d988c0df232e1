"""Text to fixed-shape int32 arrays: classification encoding and LM packing.

The tokenizer is an argument: any object whose ``encode_batch(texts)`` returns
one encoding per text, each either a ``tokenizers.Encoding`` (``.ids``, and
optionally ``.type_ids``) or a plain sequence of ids. A ``tokenizers.Tokenizer``
is used with its own truncation (so special tokens such as ``[SEP]`` survive)
and without its padding; both settings are restored afterwards.

Example:

  >>> class Chars:  # Any encode_batch works; here a character tokenizer.
  ...   def encode_batch(self, texts):
  ...     return [[ord(c) for c in t] for t in texts]
  >>> arrays = encode_classification(['a fine film'], [1], Chars(), max_len=16)
  >>> arrays['input_ids'].shape, arrays['input_ids'].dtype
  ((1, 16), dtype('int32'))
  >>> arrays['input_ids'][0, :3].tolist(), arrays['label'].tolist()
  ([97, 32, 102], [1])
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np

Tokenizer = Any  # An object with encode_batch(list[str]) -> encodings.


@contextlib.contextmanager
def _plain(tokenizer: Tokenizer, max_len: int | None) -> Iterator[None]:
  """Sets a ``tokenizers.Tokenizer`` to truncate at max_len and not pad."""
  if not hasattr(tokenizer, 'enable_truncation'):
    yield
    return
  padding, truncation = tokenizer.padding, tokenizer.truncation
  tokenizer.no_padding()
  if max_len is None:
    tokenizer.no_truncation()
  else:
    tokenizer.enable_truncation(max_len)
  try:
    yield
  finally:
    if truncation is None:
      tokenizer.no_truncation()
    else:
      tokenizer.enable_truncation(**truncation)
    if padding is not None:
      tokenizer.enable_padding(**padding)


def _str(t: str | bytes) -> str:
  return t.decode('utf-8') if isinstance(t, bytes) else str(t)


def tokenize(texts: Sequence[str], tokenizer: Tokenizer, *,
             max_len: int | None = None
             ) -> tuple[list[list[int]], list[list[int]]]:
  """Tokenizes texts without padding.

  Args:
    texts: the strings, or ``(text, pair)`` tuples for sentence pairs
      (a ``tokenizers.Tokenizer`` joins them with ``[SEP]`` and type ids).
    tokenizer: see the module docstring.
    max_len: truncate every sequence to this many tokens (None: no limit).

  Returns:
    ``(ids, type_ids)``: one list of ints per text each; ``type_ids`` are
    zeros when the tokenizer has none.
  """
  texts = [tuple(map(_str, t)) if isinstance(t, tuple) else _str(t)
           for t in texts]   # A tuple is a sentence pair.
  with _plain(tokenizer, max_len):
    encodings = tokenizer.encode_batch(texts)
  ids, type_ids = [], []
  for enc in encodings:
    seq = list(getattr(enc, 'ids', enc))
    types = list(getattr(enc, 'type_ids', None) or [0] * len(seq))
    if max_len is not None:
      seq, types = seq[:max_len], types[:max_len]
    ids.append(seq)
    type_ids.append(types)
  return ids, type_ids


def pad_to(seqs: Sequence[Sequence[int]], length: int, pad_id: int = 0
           ) -> np.ndarray:
  """Right-pads (or cuts) sequences to one length.

  Args:
    seqs: N sequences of ints.
    length: the output width.
    pad_id: the fill value.

  Returns:
    int32 array [N, length].
  """
  out = np.full((len(seqs), length), pad_id, np.int32)
  for i, seq in enumerate(seqs):
    seq = seq[:length]
    out[i, :len(seq)] = seq
  return out


def encode_classification(texts: Sequence[str],
                          labels: Sequence[int] | None,
                          tokenizer: Tokenizer, *, max_len: int,
                          pad_id: int = 0) -> dict[str, np.ndarray]:
  """Encodes labeled texts into fixed-length arrays for an encoder.

  Args:
    texts: N strings (bytes are decoded as UTF-8).
    labels: N ints, or None to leave the ``label`` key out.
    tokenizer: see the module docstring.
    max_len: sequence length; longer texts are truncated, shorter padded.
    pad_id: id that fills padded positions.

  Returns:
    A dict of int32 arrays: ``input_ids``, ``attention_mask`` (1 for tokens,
    0 for padding) and ``token_type_ids``, each [N, max_len], and ``label`` [N].

  Raises:
    ValueError: if texts and labels differ in length, or max_len < 1.
  """
  if max_len < 1:
    raise ValueError(f'max_len must be positive, got {max_len}')
  if labels is not None and len(labels) != len(texts):
    raise ValueError(f'{len(texts)} texts but {len(labels)} labels')
  ids, type_ids = tokenize(texts, tokenizer, max_len=max_len)
  lengths = np.array([len(s) for s in ids], np.int32)
  out = {
      'input_ids': pad_to(ids, max_len, pad_id),
      'attention_mask': (np.arange(max_len)[None, :]
                         < lengths[:, None]).astype(np.int32),
      'token_type_ids': pad_to(type_ids, max_len, 0),
  }
  if labels is not None:
    out['label'] = np.asarray(labels, np.int32).reshape(len(texts))
  return out


def encode_source(source: Sequence[dict[str, Any]], tokenizer: Tokenizer, *,
                  max_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Reads a whole classification source and encodes it in memory.

  Args:
    source: random-access examples with ``text`` and ``label``, e.g. from
      ``lorajax.data.sources.get_source``.
    tokenizer: see the module docstring.
    max_len: sequence length.
    pad_id: id that fills padded positions.

  Returns:
    ``encode_classification``'s arrays for every example, in source order.
  """
  examples = [source[i] for i in range(len(source))]
  return encode_classification([e['text'] for e in examples],
                               [int(e['label']) for e in examples],
                               tokenizer, max_len=max_len, pad_id=pad_id)


def token_stream(texts: Sequence[str], tokenizer: Tokenizer, *, eos_id: int,
                 bos_id: int | None = None) -> np.ndarray:
  """Concatenates tokenized documents, each followed by ``eos_id``.

  Args:
    texts: the documents, in order.
    tokenizer: see the module docstring.
    eos_id: id appended after every document.
    bos_id: id put before every document, if not None.

  Returns:
    int32 array [T] of all tokens.
  """
  ids, _ = tokenize(texts, tokenizer)
  parts = []
  for seq in ids:
    if bos_id is not None:
      parts.append([bos_id])
    parts.extend([seq, [eos_id]])
  if not parts:
    return np.zeros((0,), np.int32)
  return np.concatenate([np.asarray(p, np.int32) for p in parts])


def pack_tokens(stream: np.ndarray, *, seq_len: int) -> np.ndarray:
  """Cuts a token stream into windows of ``seq_len + 1`` tokens.

  Windows step by ``seq_len``, sharing one token with the next window, so each
  token after the first is a target exactly once. The ragged tail is dropped.

  Args:
    stream: int array [T].
    seq_len: the model's sequence length.

  Returns:
    int32 array [(T - 1) // seq_len, seq_len + 1].
  """
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  stream = np.asarray(stream, np.int32).reshape(-1)
  n = max(stream.shape[0] - 1, 0) // seq_len
  starts = np.arange(n)[:, None] * seq_len
  return stream[starts + np.arange(seq_len + 1)[None, :]]


def split_inputs_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
  """Turns ``[N, seq_len + 1]`` windows into next-token inputs and targets.

  Args:
    windows: int array [N, seq_len + 1].

  Returns:
    int32 ``inputs`` and ``targets`` [N, seq_len] and an all-ones int32
    ``mask`` [N, seq_len] (every target counts).
  """
  windows = np.asarray(windows, np.int32)
  return {'inputs': windows[:, :-1], 'targets': windows[:, 1:],
          'mask': np.ones_like(windows[:, 1:])}


def pack_lm(texts: Sequence[str], tokenizer: Tokenizer, *, seq_len: int,
            eos_id: int, bos_id: int | None = None) -> dict[str, np.ndarray]:
  """Packs documents into dense next-token examples (no padding).

  Args:
    texts: documents in order.
    tokenizer: see the module docstring.
    seq_len: the model's sequence length.
    eos_id: id that ends every document.
    bos_id: id that starts every document, if not None.

  Returns:
    ``split_inputs_targets`` of the packed windows: int32 ``inputs``,
    ``targets`` and ``mask``, each [N, seq_len].
  """
  stream = token_stream(texts, tokenizer, eos_id=eos_id, bos_id=bos_id)
  return split_inputs_targets(pack_tokens(stream, seq_len=seq_len))


def pad_lm(texts: Sequence[str], tokenizer: Tokenizer, *, seq_len: int,
           eos_id: int, pad_id: int = 0, bos_id: int | None = None
           ) -> dict[str, np.ndarray]:
  """One document per row, truncated and padded (the unpacked mode).

  Args:
    texts: N documents.
    tokenizer: see the module docstring.
    seq_len: the model's sequence length.
    eos_id: id that ends every document.
    pad_id: id that fills padded positions.
    bos_id: id that starts every document, if not None.

  Returns:
    int32 ``inputs``, ``targets`` and ``mask`` [N, seq_len]; ``mask`` is 1
    where ``targets`` holds a real next token, 0 on padding.
  """
  ids, _ = tokenize(texts, tokenizer)
  rows = [([] if bos_id is None else [bos_id]) + seq + [eos_id]
          for seq in ids]
  full = pad_to(rows, seq_len + 1, pad_id)
  lengths = np.array([min(len(r), seq_len + 1) for r in rows], np.int32)
  out = split_inputs_targets(full)
  out['mask'] = (np.arange(seq_len)[None, :]
                 < (lengths - 1)[:, None]).astype(np.int32)
  return out
