"""Build a ``LoraSpec`` back from a per-path decision.

Adapters that are imported, stacked or combined arrive as "this path gets
that provider"; these helpers write the shortest readable rules that select
exactly those paths (layer numbers become ``\\d+`` when that stays exact).

Example:

  >>> universe = ['l_0/q/kernel', 'l_1/q/kernel', 'l_0/k/kernel']
  >>> exact_regex(['l_0/q/kernel', 'l_1/q/kernel'], universe)
  'l_\\\\d+/q/kernel'
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from lorajax import spec as spec_lib


def exact_regex(chosen: Iterable[str], universe: Iterable[str]) -> str:
  """A regex whose ``re.fullmatch`` over ``universe`` selects ``chosen``.

  Args:
    chosen: the names to select (a subset of ``universe``).
    universe: every name the regex will be matched against.

  Returns:
    A pattern: digit runs generalised to ``\\d+`` if that stays exact,
    else an alternation of the escaped names.
  """
  chosen = sorted(set(chosen))
  universe = list(universe)
  if not chosen:
    raise ValueError('exact_regex needs at least one name')
  want = set(chosen)
  general = sorted({re.sub(r'\d+', r'\\d+', re.escape(p)) for p in chosen})
  for parts in (general, [re.escape(p) for p in chosen]):
    pattern = parts[0] if len(parts) == 1 else '(?:' + '|'.join(parts) + ')'
    if {p for p in universe if re.fullmatch(pattern, p)} == want:
      return pattern
  raise AssertionError(f'no exact regex for {chosen[:3]}')  # unreachable


def spec_from_actions(actions: Mapping[str, spec_lib.Action],
                      universe: Iterable[str]) -> spec_lib.LoraSpec:
  """One rule per distinct action (first seen first), then ``'.*' -> freeze``.

  Args:
    actions: path -> provider or ``'train'``; unlisted paths are frozen.
    universe: every parameter path of the tree the spec is for.
  """
  universe = list(universe)
  groups: dict[int, list[str]] = {}
  distinct: list[spec_lib.Action] = []
  for path, action in actions.items():
    for i, seen in enumerate(distinct):
      if seen == action:
        groups[i].append(path)
        break
    else:
      distinct.append(action)
      groups[len(distinct) - 1] = [path]
  rules = [(exact_regex(groups[i], universe), action)
           for i, action in enumerate(distinct)]
  return spec_lib.LoraSpec(rules + [('.*', spec_lib.FREEZE)])
