"""Where a compiled step's time goes: XLA's own per-op trace, by category.

``breakdown(hlo_text, run, steps=5)`` calls ``run()`` (one step of a
compiled computation, e.g. ``jax.jit(f).lower(*args).compile()``, whose
optimized HLO is ``hlo_text = compiled.as_text()``) under ``jax.profiler``
and sums the
duration of every XLA op event of the trace (on CPU, one event per thunk,
named after its HLO instruction). ``categories(hlo_text)`` names each
instruction of the optimized HLO module by what it does:

- ``matmul``: a dot or convolution with no batch dimensions (dense layers,
  LoRA factors, the output projection of an LM), alone or fused with
  elementwise work;
- ``batched matmul``: a dot with batch dimensions (attention scores and
  values, per-expert products);
- ``reduction``: a fusion with a reduce and no dot (softmax, layer norm,
  loss, gradient sums over the batch);
- ``elementwise``: any other fusion or arithmetic (activations, the
  optimizer update, masks);
- ``copy``: copies, transposes, concatenations, slices, gathers, scatters
  and dynamic updates (data movement);
- ``other``: custom calls, sorts, RNG, and what none of the above names.

Control flow (``while``, ``call``, ``conditional``) is not an op of its own:
its events contain its body's, which are counted instead.

The sum over categories is op time, which can exceed the step's wall time
when the runtime runs independent ops on several threads at once, or fall
short of it by the host's dispatch; ``summarize`` reports both.

Example:

  >>> text = '''
  ... %fused_computation (p: f32[4,8]) -> f32[4,8] {
  ...   %p = f32[4,8]{1,0} parameter(0)
  ...   ROOT %d = f32[4,8]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ... }
  ... ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  ...   %a = f32[4,8]{1,0} parameter(0)
  ...   %t = f32[8,4]{0,1} transpose(%a), dimensions={1,0}
  ...   ROOT %fusion = f32[4,8]{1,0} fusion(%a), kind=kOutput, calls=%fused_computation
  ... }
  ... '''
  >>> sorted(categories(text).items())
  [('fusion', 'matmul'), ('t', 'copy')]
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax

CATEGORIES = ('matmul', 'batched matmul', 'reduction', 'elementwise',
              'copy', 'other')
_COPY_OPS = frozenset({
    'copy', 'transpose', 'concatenate', 'slice', 'dynamic-slice',
    'dynamic-update-slice', 'gather', 'scatter', 'pad', 'reverse',
    'broadcast', 'reshape', 'bitcast', 'copy-start', 'copy-done'})
_CONTROL_OPS = frozenset({'while', 'call', 'conditional'})
_NOT_RUN = frozenset({'parameter', 'constant', 'tuple', 'get-tuple-element',
                      'bitcast', 'after-all', 'partition-id', 'replica-id'})
_OTHER_OPS = frozenset({'custom-call', 'sort', 'rng', 'rng-bit-generator',
                        'rng-get-and-update-state', 'infeed', 'outfeed',
                        'all-reduce', 'all-gather', 'reduce-scatter',
                        'all-to-all', 'collective-permute'})
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*)$')
_OPCODE = re.compile(r'\s([a-z][a-z0-9\-]*)\(')
_CALLS = re.compile(r'calls=%([\w.\-]+)')
_APPLIES = re.compile(r'(?:calls|to_apply)=%([\w.\-]+)')


def _parse(hlo_text: str) -> dict[str, list[tuple[str, str, str]]]:
  """Computation name -> its instructions as (name, opcode, line)."""
  computations: dict[str, list[tuple[str, str, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and ' = ' not in line.split('{')[0]:
      current = computations.setdefault(m.group(1), [])
      continue
    if line.strip() == '}':
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      op = _OPCODE.search(' ' + m.group(2))
      current.append((m.group(1), op.group(1) if op else '', line))
  return computations


def _kind(ops: Sequence[tuple[str, str, str]],
          computations: Mapping[str, list[tuple[str, str, str]]],
          depth: int = 0) -> str:
  """The category of a fused computation (or a single op) from its ops."""
  opcodes = set()
  batched = False
  for _, opcode, line in ops:
    opcodes.add(opcode)
    if opcode == 'dot' and 'lhs_batch_dims=' in line:
      batched = True
    if opcode == 'fusion' and depth < 4:  # Nested fusions: look inside.
      m = _CALLS.search(line)
      inner = computations.get(m.group(1), []) if m else []
      kind = _kind(inner, computations, depth + 1)
      opcodes.add({'matmul': 'dot', 'batched matmul': 'dot',
                   'reduction': 'reduce'}.get(kind, ''))
      batched |= kind == 'batched matmul'
  if opcodes & {'dot', 'convolution'}:
    return 'batched matmul' if batched else 'matmul'
  if opcodes & _OTHER_OPS:
    return 'other'
  if opcodes & {'reduce', 'reduce-window', 'select-and-scatter'}:
    return 'reduction'
  run = opcodes - _NOT_RUN
  if run and run <= _COPY_OPS:
    return 'copy'
  return 'elementwise'


def categories(hlo_text: str) -> dict[str, str]:
  """Instruction name -> category, for every op that runs as its own event
  (the entry's and control-flow bodies' instructions; not fused ones)."""
  computations = _parse(hlo_text)
  inlined = set()  # Fusion bodies and reducers: never events of their own.
  for ops in computations.values():
    for _, opcode, line in ops:
      if opcode not in _CONTROL_OPS:
        inlined.update(_APPLIES.findall(line))
  out = {}
  for comp, ops in computations.items():
    if comp in inlined:
      continue
    for name, opcode, line in ops:
      if opcode in _NOT_RUN or opcode in _CONTROL_OPS:
        continue
      if opcode == 'fusion':
        m = _CALLS.search(line)
        out[name] = _kind(computations.get(m.group(1), []) if m else [],
                          computations)
      else:
        out[name] = _kind([(name, opcode, line)], computations)
  return out


def _trace_events(trace_dir: str) -> list[dict[str, Any]]:
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                    recursive=True)
  if not paths:
    raise RuntimeError(f'jax.profiler wrote no perfetto trace under '
                       f'{trace_dir}')
  with gzip.open(max(paths, key=os.path.getmtime), 'rt') as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return [e for e in events if e.get('ph') == 'X' and 'dur' in e]


def breakdown(hlo_text: str, run: Callable[[], Any], *, steps: int = 5
              ) -> dict[str, Any]:
  """Calls ``run()`` once untraced, then ``steps`` times under the profiler.

  ``run`` runs one step of the computation whose optimized HLO module is
  ``hlo_text`` (a train step may feed its state back; the ops are the same
  each step) and returns what to wait for.

  Returns:
    ``ms``: category -> milliseconds of op time per step (every category of
    CATEGORIES present, zero where none ran); ``op_ms``: their sum;
    ``wall_ms``: the median wall time of a traced step (tracing adds a
    little); ``top``: the ten slowest ops as (name, category, ms per step).
  """
  names = categories(hlo_text)
  jax.block_until_ready(run())  # Warm: page in, first-run costs.
  walls = []
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    try:
      for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        walls.append(time.perf_counter() - t0)
    finally:
      jax.profiler.stop_trace()
    events = _trace_events(tmp)
  per_op = collections.Counter()
  for e in events:
    if e['name'] in names:
      per_op[e['name']] += float(e['dur']) / 1e3 / steps  # us -> ms/step.
  ms = {c: 0.0 for c in CATEGORIES}
  for name, t in per_op.items():
    ms[names[name]] += t
  walls.sort()
  return {'ms': ms, 'op_ms': sum(ms.values()),
          'wall_ms': 1e3 * walls[len(walls) // 2],
          'top': [(n, names[n], t) for n, t in per_op.most_common(10)]}


def summarize(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """A markdown table: one column a measured step (label -> ``breakdown``),
  ms per step and share of op time per category."""
  labels = list(rows)
  head = '| category | ' + ' | '.join(labels) + ' |'
  lines = [head, '|---|' + '---:|' * len(labels)]
  for c in CATEGORIES:
    cells = []
    for label in labels:
      r = rows[label]
      share = r['ms'][c] / r['op_ms'] if r['op_ms'] else 0.0
      cells.append(f'{r["ms"][c]:.1f} ms ({100 * share:.0f}%)')
    lines.append(f'| {c} | ' + ' | '.join(cells) + ' |')
  lines.append('| op time | ' + ' | '.join(
      f'{rows[l]["op_ms"]:.1f} ms' for l in labels) + ' |')
  lines.append('| step wall time (median) | ' + ' | '.join(
      f'{rows[l]["wall_ms"]:.1f} ms' for l in labels) + ' |')
  return '\n'.join(lines)
