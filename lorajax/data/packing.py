"""Tokenized examples to next-token rows: one a row, or packed with segment ids.

An example is ``(ids, mask)``: its token ids and which of them are trained
(e.g. ``lorajax.data.chat.encode_chat``'s assistant mask). Its next-token
form is ``inputs = ids[:-1]``, ``targets = ids[1:]`` and a loss mask
``mask[1:]`` (a prediction counts when its target is trained), so no
target ever belongs to another example.

``pad_examples`` puts one example in each row; ``pack_examples`` puts
several, first-fit by decreasing length, and numbers them in
``segment_ids`` (1, 2, ... in each row; 0 is padding) with ``positions``
that restart at 0 for each. A model that attends only within a segment
(``Llama(segment_ids=...)``) then computes for each example exactly what
it computes for it alone, so the packed and unpacked losses agree.

Example:

  >>> examples = [([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10, 11], [0, 1, 1])]
  >>> rows = pack_examples(examples, seq_len=6)
  >>> rows['inputs'].tolist(), rows['segment_ids'].tolist()
  ([[5, 6, 7, 9, 10, 0]], [[1, 1, 1, 2, 2, 0]])
  >>> rows['targets'].tolist(), rows['mask'].tolist()
  ([[6, 7, 8, 10, 11, 0]], [[0, 1, 1, 1, 1, 0]])
  >>> rows['positions'].tolist()
  [[0, 1, 2, 0, 1, 0]]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Example = tuple[Sequence[int], Sequence[int]]
Arrays = dict[str, np.ndarray]
KEYS = ('inputs', 'targets', 'mask', 'segment_ids', 'positions')


def _next_token(examples: Sequence[Example], seq_len: int
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """``(inputs, targets, mask)`` of each example, cut to ``seq_len``."""
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  out = []
  for i, (ids, mask) in enumerate(examples):
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
    if ids.shape != mask.shape or ids.ndim != 1:
      raise ValueError(f'example {i}: ids {ids.shape} and mask {mask.shape} '
                       'must be equal 1-D shapes')
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    out.append((ids[:-1], ids[1:], mask[1:]))
  return out


def _rows(pieces: Sequence[Sequence[tuple[np.ndarray, ...]]], seq_len: int,
          pad_id: int) -> Arrays:
  n = len(pieces)
  out = {k: np.zeros((n, seq_len), np.int32) for k in KEYS}
  out['inputs'][:] = pad_id
  out['targets'][:] = pad_id
  for r, row in enumerate(pieces):
    at = 0
    for seg, (inputs, targets, mask) in enumerate(row, start=1):
      end = at + len(inputs)
      out['inputs'][r, at:end] = inputs
      out['targets'][r, at:end] = targets
      out['mask'][r, at:end] = mask
      out['segment_ids'][r, at:end] = seg
      out['positions'][r, at:end] = np.arange(len(inputs))
      at = end
  return out


def pad_examples(examples: Sequence[Example], *, seq_len: int,
                 pad_id: int = 0) -> Arrays:
  """One example a row, right-padded; see the module docstring.

  Args:
    examples: ``(ids, mask)`` pairs.
    seq_len: the row width; longer examples are cut to ``seq_len + 1``
      tokens.
    pad_id: the id of padding inputs and targets.

  Returns:
    int32 ``inputs``, ``targets``, ``mask``, ``segment_ids`` (1 on the
    example, 0 on padding) and ``positions``, each ``[N, seq_len]``.
  """
  return _rows([[x] for x in _next_token(examples, seq_len) if len(x[0])],
               seq_len, pad_id)


def pack_examples(examples: Sequence[Example], *, seq_len: int,
                  pad_id: int = 0) -> Arrays:
  """Several examples a row (first-fit decreasing); deterministic.

  Args:
    examples: ``(ids, mask)`` pairs.
    seq_len: the row width; longer examples are cut to ``seq_len + 1``
      tokens (one row each).
    pad_id: the id of padding inputs and targets.

  Returns:
    ``pad_examples``' arrays with fewer rows; ``segment_ids`` number the
    examples of a row from 1.
  """
  items = [x for x in _next_token(examples, seq_len) if len(x[0])]
  order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i))
  free = np.zeros((0,), np.int64)   # Room left in each row.
  rows: list[list[int]] = []
  for i in order:
    need = len(items[i][0])
    fits = np.flatnonzero(free >= need)
    if fits.size:
      r = int(fits[0])
    else:
      r = len(rows)
      rows.append([])
      free = np.append(free, seq_len)
    rows[r].append(i)
    free[r] -= need
  return _rows([[items[i] for i in row] for row in rows], seq_len, pad_id)


def efficiency(arrays: Arrays) -> float:
  """Fraction of input slots that hold an example's token (not padding)."""
  seg = arrays['segment_ids']
  return float((seg > 0).sum() / max(seg.size, 1))
