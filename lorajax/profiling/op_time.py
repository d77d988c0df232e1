"""Where a compiled step's time goes: XLA's own per-op trace, by category.

``breakdown(hlo_text, run, steps=5)`` calls ``run()`` (one step of a
compiled computation, e.g. ``jax.jit(f).lower(*args).compile()``, whose
optimized HLO is ``hlo_text = compiled.as_text()``) under ``jax.profiler``
and splits the step's wall time between the XLA ops that ran (on CPU, one
thunk per op, named after its HLO instruction). ``categories(hlo_text)``
names each instruction of the optimized HLO module by what it does:

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
- ``fused attention``: lorajax's fused CPU attention kernel
  (``lorajax.runtime.cpu_attention``), forward or backward: scores,
  softmax and both products of one attention in one call;
- ``other``: other custom calls, sorts, RNG, and what none of the above
  names.

Control flow (``while``, ``call``, ``conditional``) is not an op of its own:
its events contain its body's, which are counted instead.

How an op's time is read. On CPU, XLA's thunk executor records an event
named after the op when the op starts and, for an op that completes
asynchronously (a dot handed to Eigen's thread pool), a second event
``end: <op>`` when it completes; the op ran from the first event's start to
the later of the two events' ends. Reading the first event alone misses
almost all of a dot's time (on a MiniLM LoRA step at 32 × 128 tokens, it
counted 0.84 s of ops in a 1.5 s step and put the products at 27% of the
step; read to their ends, they take 72%).
The executor also runs independent ops at once on its threads; each instant
of the step is split equally between the ops running then, so the
categories add up to the time some op was running (``op_ms``), which the
wall time exceeds only by idle gaps (``idle_ms``).

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

CATEGORIES = ('matmul', 'batched matmul', 'fused attention', 'reduction',
              'elementwise', 'copy', 'other')
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
    if (opcode == 'custom-call'
        and 'custom_call_target="lorajax_attention_' in line):
      return 'fused attention'
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


def _op_intervals(events: Sequence[Mapping[str, Any]],
                  names: Mapping[str, str]) -> list[tuple[float, float, str]]:
  """(start, end, op) in microseconds for every traced run of an op of
  ``names``: from its event's start to the later of that event's end and
  the end of the first ``end: <op>`` event after it that comes before the
  op's next run (none: the event's own end)."""
  starts: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
  ends: dict[str, list[float]] = collections.defaultdict(list)
  for e in events:
    name, ts, dur = e['name'], float(e['ts']), float(e['dur'])
    if name in names:
      starts[name].append((ts, ts + dur))
    elif name.startswith('end: ') and name[5:] in names:
      ends[name[5:]].append(ts + dur)
  out = []
  for name, runs in starts.items():
    runs.sort()
    done = sorted(ends.get(name, []))
    j = 0
    for i, (t0, t1) in enumerate(runs):
      limit = runs[i + 1][0] if i + 1 < len(runs) else float('inf')
      while j < len(done) and done[j] < t0:
        j += 1
      end = t1
      if j < len(done) and done[j] <= limit:
        end = max(t1, done[j])
        j += 1
      out.append((t0, end, name))
  return out


def _share_wall_time(intervals: Sequence[tuple[float, float, str]]
                     ) -> tuple[dict[str, float], float]:
  """Each instant split equally between the ops running then.

  Returns (op -> attributed microseconds, sum over ops of their whole
  intervals); the first sums to the time some op was running.
  """
  points = sorted([(t0, 1, n) for t0, _, n in intervals]
                  + [(t1, -1, n) for _, t1, n in intervals],
                  key=lambda p: (p[0], p[1]))
  running: collections.Counter = collections.Counter()
  share: collections.Counter = collections.Counter()
  last = None
  for t, delta, name in points:
    if last is not None and t > last:
      k = sum(running.values())
      for op, c in running.items():
        share[op] += (t - last) * c / k
    running[name] += delta
    if not running[name]:
      del running[name]   # keep only the ops running now
    last = t
  return dict(share), sum(t1 - t0 for t0, t1, _ in intervals)


def breakdown(hlo_text: str, run: Callable[[], Any], *, steps: int = 5
              ) -> dict[str, Any]:
  """Calls ``run()`` once untraced, then ``steps`` times under the profiler.

  ``run`` runs one step of the computation whose optimized HLO module is
  ``hlo_text`` (a train step may feed its state back; the ops are the same
  each step) and returns what to wait for.

  Returns, per step:
    ``ms``: category -> milliseconds of the step's wall time spent in that
    category's ops, an instant shared equally between the ops running at
    once (every category of CATEGORIES present, zero where none ran);
    ``op_ms``: their sum, the time some op was running;
    ``wall_ms``: the median wall time of a traced step (tracing adds a
    little); ``mean_wall_ms``: their mean, the statistic ``op_ms`` (a mean
    over the steps) compares with; ``idle_ms``: ``mean_wall_ms`` less
    ``op_ms`` (dispatch, waits; not below 0);
    ``concurrency``: the ops' whole durations summed, over ``op_ms`` (how
    many ops ran at once, on average);
    ``top``: the ten ops with the most time, as (name, category, ms).
  """
  names = categories(hlo_text)
  jax.block_until_ready(run())  # Warm: page in, first-run costs.
  walls = []
  share: collections.Counter = collections.Counter()
  whole = 0.0
  # One trace a step: a trace of several long steps overflows the
  # profiler's buffers and loses events (5 SmolLM2 steps: 60% of the step
  # with no op seen running).
  for _ in range(steps):
    with tempfile.TemporaryDirectory() as tmp:
      jax.profiler.start_trace(tmp, create_perfetto_trace=True)
      try:
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        walls.append(time.perf_counter() - t0)
      finally:
        jax.profiler.stop_trace()
      events = _trace_events(tmp)
    step_share, step_whole = _share_wall_time(_op_intervals(events, names))
    share.update(step_share)
    whole += step_whole
  per_op = collections.Counter(
      {n: us / 1e3 / steps for n, us in share.items()})   # us -> ms/step
  ms = {c: 0.0 for c in CATEGORIES}
  for name, t in per_op.items():
    ms[names[name]] += t
  op_ms = sum(ms.values())
  walls.sort()
  wall_ms = 1e3 * walls[len(walls) // 2]
  mean_wall_ms = 1e3 * sum(walls) / len(walls)
  return {'ms': ms, 'op_ms': op_ms, 'wall_ms': wall_ms,
          'mean_wall_ms': mean_wall_ms,
          'idle_ms': max(0.0, mean_wall_ms - op_ms),
          'concurrency': whole / 1e3 / steps / op_ms if op_ms else 0.0,
          'top': [(n, names[n], t) for n, t in per_op.most_common(10)]}


def summarize(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """A markdown table: one column a measured step (label -> ``breakdown``),
  ms of wall time per step and share of op time per category, then op
  time, idle time, wall time and ops at once."""
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
  def row(title, fmt):
    lines.append(f'| {title} | ' + ' | '.join(fmt(rows[l]) for l in labels)
                 + ' |')
  row('op time', lambda r: f'{r["op_ms"]:.1f} ms')
  row('idle (no op running)', lambda r: f'{r.get("idle_ms", 0.0):.1f} ms')
  row('step wall time (median)', lambda r: f'{r["wall_ms"]:.1f} ms')
  row('ops running at once (mean)', lambda r: f'{r.get("concurrency", 0):.2f}')
  return '\n'.join(lines)
