"""Where a run's numbers go: JSON lines, TensorBoard, a summary.

``metrics.jsonl`` gets one object a line: ``{"step": 10, "split": "train",
"loss": 0.52, ...}``. TensorBoard event files (``tensorboardX``, no
TensorFlow) get the same scalars as ``<split>/<name>``. Only process 0
writes. A resumed run appends; ``read_jsonl`` keeps the last line of each
``(split, step)``, which is what the run would have written uninterrupted.

Example:

  >>> import tempfile
  >>> workdir = tempfile.mkdtemp()
  >>> writer = MetricWriter(workdir, tensorboard=False)
  >>> writer.write(10, 'train', {'loss': 0.5})
  >>> writer.close()
  >>> read_jsonl(os.path.join(workdir, JSONL))
  {10: {'step': 10, 'split': 'train', 'loss': 0.5}}
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax

JSONL = 'metrics.jsonl'


def _clean(value: Any) -> Any:
  value = float(value) if hasattr(value, '__float__') else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN; keep it readable.
  return value


class MetricWriter:
  """Appends scalars to ``metrics.jsonl`` and TensorBoard under ``workdir``."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._file = None
    self._tb = None
    if not self._active:
      return
    self._file = open(os.path.join(workdir, JSONL), 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    """Writes one line of ``scalars`` for ``split`` at ``step``."""
    if not self._active:
      return
    row = {'step': int(step), 'split': split}
    row.update({k: _clean(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      for name, value in row.items():
        if name not in ('step', 'split') and isinstance(value, (int, float)):
          self._tb.add_scalar(f'{split}/{name}', value, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: str, split: str = 'train') -> dict[int, dict[str, Any]]:
  """``{step: row}`` of one split, the last row of each step winning."""
  out = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut by a kill.
      if row.get('split') == split:
        out[row['step']] = row
  return dict(sorted(out.items()))


def format_metrics(metrics: Mapping[str, float] | None) -> str:
  """``'loss 0.4123, accuracy 0.8420'``; ``'n/a'`` for none."""
  if not metrics:
    return 'n/a'
  return ', '.join(f'{k} {v:.4f}' for k, v in metrics.items())


def human_bytes(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if n < 1024 or unit == 'GB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} GB'


def format_summary(s: Mapping[str, Any]) -> str:
  """The end-of-run summary a person reads (from ``train_and_evaluate``)."""
  metric = s['metric']
  fmt = format_metrics
  lines = [
      '=' * 64,
      f'run          {s["config_name"]}  (method {s["method"]}, '
      f'{s["steps"]} steps)',
      f'trainable    {s["trainable_params"]:,d} of {s["all_params"]:,d} '
      f'params ({100 * s["trainable_fraction"]:.3f}%)',
  ]
  if s.get('initial_validation'):
    lines.append(f'validation   at start: {fmt(s["initial_validation"])}')
  if s.get('best_validation'):
    lines.append(f'validation   best {metric} {s["best_validation"][metric]:.4f}'
                 f' at step {s["best_validation_step"]}; final: '
                 f'{fmt(s["final_validation"])}')
  lines += [
      f'test         {fmt(s["test"])}' + (
          f' (at the best validation step {s["test_step"]}; last step: '
          f'{fmt(s["test_final"])})'
          if s.get('test_step') not in (None, s['steps']) else ''),
      f'wall time    {s["wall_time_s"]:.1f} s (training {s["train_time_s"]:.1f}'
      f' s, {s["tokens_per_sec"]:,.0f} tokens/s)',
      f'checkpoint   adapter {human_bytes(s["adapter_bytes"])} (trainable/ '
      f'of step {s["checkpoint_step"]}), with optimizer '
      f'{human_bytes(s["checkpoint_bytes"])}',
      *([f'prompts      {s["prompts_params"]:,d} params (folded) in '
         f'{s["prompts_file"]}'] if s.get('prompts_file') else []),
      f'workdir      {s["workdir"]}',
      '=' * 64,
  ]
  return '\n'.join(lines)
