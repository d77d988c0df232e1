"""A ``LoraSpec`` as JSON and back.

A spec is stored next to the adapters it made, so that a file alone says how
to apply them: which paths, which method, its rank and scale. Rules become a
list of ``[regex, action]`` pairs; an action is ``"train"``, ``"freeze"`` or an
object ``{"method": "Lora", "rank": 8, "alpha": 16.0, ...}``.

Providers are registered by name. A frozen dataclass whose fields are JSON
values (numbers, strings, booleans, None) needs nothing more than
``register_provider(MyProvider)``; a provider that holds something else (a
nested provider, a dtype) passes its own ``to_json`` / ``from_json``.

Example:

  >>> from lorajax import Lora, LoraSpec
  >>> spec = LoraSpec([(r'.*/query/kernel', Lora(rank=4)), (r'.*', 'freeze')])
  >>> spec_from_json(spec_to_json(spec)) == spec
  True
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from lorajax import spec as spec_lib
from lorajax.methods import adalora as adalora_lib
from lorajax.methods import bottleneck as bottleneck_lib
from lorajax.methods import dora as dora_lib
from lorajax.methods import ia3 as ia3_lib
from lorajax.methods import loha as loha_lib
from lorajax.methods import lokr as lokr_lib
from lorajax.methods import low_rank as lora_lib
from lorajax.methods import oft as oft_lib
from lorajax.methods import qlora as qlora_lib
from lorajax.methods import vera as vera_lib

FORMAT_VERSION = 1
_JSON_SCALARS = (bool, int, float, str, type(None))


@dataclasses.dataclass(frozen=True)
class _Codec:
  cls: type
  to_json: Callable[[Any], dict[str, Any]]
  from_json: Callable[[dict[str, Any]], Any]


_PROVIDERS: dict[str, _Codec] = {}


def _dataclass_to_json(provider: Any) -> dict[str, Any]:
  out = {}
  for field in dataclasses.fields(provider):
    value = getattr(provider, field.name)
    if isinstance(value, tuple) and all(isinstance(v, _JSON_SCALARS)
                                        for v in value):
      value = list(value)  # e.g. Lora.batch_axes; the provider re-tuples it.
    elif not isinstance(value, _JSON_SCALARS):
      raise TypeError(
          f'{type(provider).__name__}.{field.name} = {value!r} is not a JSON '
          f'scalar; register the provider with its own to_json/from_json')
    out[field.name] = value
  return out


def register_provider(cls: type, *, name: str | None = None,
                      to_json: Callable[[Any], dict[str, Any]] | None = None,
                      from_json: Callable[[dict[str, Any]], Any] | None = None
                      ) -> None:
  """Makes a provider class storable in spec JSON.

  Args:
    cls: the provider class (a subclass of ``lorajax.spec.Adapter``).
    name: the ``"method"`` tag in JSON; defaults to the class name.
    to_json: provider -> dict of JSON values (without ``"method"``); defaults
      to the dataclass fields, which must be JSON scalars.
    from_json: that dict -> provider; defaults to ``cls(**fields)``.
  """
  name = name or cls.__name__
  _PROVIDERS[name] = _Codec(cls, to_json or _dataclass_to_json,
                            from_json or (lambda d: cls(**d)))


def _name_of(provider: Any) -> str:
  for name, codec in _PROVIDERS.items():
    if type(provider) is codec.cls:  # pylint: disable=unidiomatic-typecheck
      return name
  raise TypeError(
      f'provider {provider!r} ({type(provider).__name__}) is not registered '
      f'for JSON; call lorajax.io.spec_json.register_provider('
      f'{type(provider).__name__}). Registered: {sorted(_PROVIDERS)}')


def action_to_json(action: spec_lib.Action) -> Any:
  """``'train'``/``'freeze'`` stay strings; a provider becomes a dict."""
  if action in (spec_lib.TRAIN, spec_lib.FREEZE):
    return action
  name = _name_of(action)
  return {'method': name, **_PROVIDERS[name].to_json(action)}


def action_from_json(value: Any) -> spec_lib.Action:
  """Inverse of ``action_to_json``."""
  if value in (spec_lib.TRAIN, spec_lib.FREEZE):
    return value
  if not isinstance(value, dict) or 'method' not in value:
    raise ValueError(f"spec action {value!r} is neither 'train', 'freeze' nor "
                     f"an object with a 'method' key")
  fields = dict(value)
  name = fields.pop('method')
  if name not in _PROVIDERS:
    raise ValueError(f'spec action names method {name!r}, which this lorajax '
                     f'does not know; known: {sorted(_PROVIDERS)}')
  try:
    return _PROVIDERS[name].from_json(fields)
  except TypeError as e:
    raise ValueError(f'spec action {value!r}: {e}') from None


def spec_to_json(spec: spec_lib.LoraSpec) -> dict[str, Any]:
  """``{"format": 1, "rules": [[regex, action], ...]}``."""
  return {'format': FORMAT_VERSION,
          'rules': [[pattern, action_to_json(action)]
                    for pattern, action in spec.rules]}


def spec_from_json(data: dict[str, Any] | str) -> spec_lib.LoraSpec:
  """Inverse of ``spec_to_json``; accepts the dict or its JSON text.

  Raises:
    ValueError: an unknown format version or method, or malformed rules.
  """
  if isinstance(data, str):
    data = json.loads(data)
  version = data.get('format')
  if version != FORMAT_VERSION:
    raise ValueError(f'spec JSON has format {version!r}; this lorajax reads '
                     f'format {FORMAT_VERSION}')
  rules = data.get('rules')
  if not isinstance(rules, list) or not all(
      isinstance(r, list) and len(r) == 2 for r in rules):
    raise ValueError('spec JSON "rules" must be a list of [regex, action] '
                     f'pairs, got {str(rules)[:200]}')
  return spec_lib.LoraSpec([(p, action_from_json(a)) for p, a in rules])


for _cls in (lora_lib.Lora, dora_lib.Dora, qlora_lib.Quantized, qlora_lib.QLora,
             bottleneck_lib.Bottleneck, ia3_lib.Ia3,
             loha_lib.LoHa, lokr_lib.LoKr, oft_lib.Oft):
  register_provider(_cls)
register_provider(vera_lib.Vera, to_json=vera_lib.projections_to_json,
                  from_json=vera_lib.projections_from_json)
register_provider(adalora_lib.AdaLora)
