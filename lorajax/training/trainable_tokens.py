"""A run's trainable token rows: ``config.trainable_tokens``, ``new_tokens``.

Two config fields train chosen rows of the word embedding next to (or
instead of) a method's adapters (``lorajax.methods.tokens``; PEFT's
``trainable_token_indices``):

  config.trainable_tokens = '5,17'        # ids already in the vocabulary
  config.new_tokens = '<|tool|>,<|/tool|>'  # strings added to the tokenizer

``add_new_tokens`` (the end of ``model_loading.load_model``) adds the new
strings to a copy of the tokenizer as special tokens (they encode whole, so
a chat template that writes them gives their ids) and grows the embedding,
and an untied output head, to the new vocabulary: the new rows are drawn as
transformers' ``resize_token_embeddings`` draws them, from ``config.seed``,
so a resumed run, an evaluation and an export rebuild the same base.
``for_model`` (``attach.attach_method``) gives the ``TrainableTokens`` of the
run: the listed ids and the new tokens' ids, in the embedding and, when the
head is untied, in the head (a tied head is the embedding).

Refused, naming the field and value: an id out of range or listed twice, a
new token the vocabulary already has (list its id instead), a model whose
embedding lorajax does not know (``model.factory``), a method that does not
run token rows (prompt methods, bottleneck adapters), and a spec that also
trains or adapts the embedding or the head.

Example:

  >>> parse_ids('3, 17,42', 'config.trainable_tokens')
  (3, 17, 42)
  >>> parse_new(' <a>,<b> ', 'config.new_tokens')
  ('<a>', '<b>')
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import tokenizers

from lorajax import spec as spec_lib
from lorajax.io import digests
from lorajax.io import hf_models
from lorajax.methods import tokens as tokens_lib
from lorajax.models import bert
from lorajax.models import llama

PyTree = Any
# Methods whose model runs no token rows (their own prompt inputs or
# adapter layers; PEFT has no trainable_token_indices for them either).
REFUSED_METHODS = ('prompt', 'prefix', 'ptuning', 'bottleneck')
EMBED, HEAD = 'embed', 'head'


def parse_ids(value: Any, field: str) -> tuple[int, ...]:
  """``'3,17'`` (or a sequence of ints) as a tuple of ints; ``()`` for ``''``.

  Raises:
    ValueError: naming ``field`` and an entry that is not an integer.
  """
  if isinstance(value, str):
    items = [s.strip() for s in value.split(',') if s.strip()]
    out = []
    for s in items:
      try:
        out.append(int(s))
      except ValueError:
        raise ValueError(f'{field}={value!r}: {s!r} is not a token id; give '
                         'comma-separated integers') from None
    return tuple(out)
  return tuple(value or ())


def parse_new(value: Any, field: str) -> tuple[str, ...]:
  """``'<a>,<b>'`` (spaces around each stripped) as a tuple of strings.

  Raises:
    ValueError: the same string twice.
  """
  items = ([s.strip() for s in value.split(',') if s.strip()]
           if isinstance(value, str) else [str(s) for s in value or ()])
  for i, s in enumerate(items):
    if s in items[:i]:
      raise ValueError(f'{field}: {s!r} is listed twice')
  return tuple(items)


def _fields(config) -> tuple[tuple[int, ...], tuple[str, ...]]:
  return (parse_ids(config.get('trainable_tokens', ''),
                    'config.trainable_tokens'),
          parse_new(config.get('new_tokens', ''), 'config.new_tokens'))


def wanted(config) -> bool:
  """Whether the config trains token rows."""
  ids, new = _fields(config)
  return bool(ids or new)


def _tables(model_config: Any, params: PyTree, where: str
            ) -> dict[str, tuple[str, int]]:
  """``{name: (path, vocabulary axis)}`` of the tables token rows go in."""
  if isinstance(model_config, llama.LlamaConfig):
    out = {EMBED: ('embed/embedding', 0)}
    if not model_config.tie_embeddings and 'lm_head' in params:
      out[HEAD] = ('lm_head/kernel', 1)   # Dense [d, V]
    return out
  if isinstance(model_config, bert.BertConfig):
    return {EMBED: ('embeddings/word_embeddings/embedding', 0)}
  raise ValueError(f'{where} needs a model whose word embedding lorajax '
                   'knows (the shipped models, or a model.path '
                   'checkpoint); this one has config '
                   f'{type(model_config).__name__}')


def add_new_tokens(config, model: Any) -> Any:
  """``model`` with ``config.new_tokens`` in its tokenizer and tables.

  Returns ``model`` itself when there are none; otherwise a copy
  (``dataclasses.replace``) with a new tokenizer, parameters, config,
  module, ``embedding`` and ``info`` (``vocab_size``, ``new_tokens``).
  The vocabulary grows to hold the new ids (not when a padded table has
  room for them already).

  Raises:
    ValueError: a new token already in the vocabulary, a model without a
      tokenizer that can add tokens or without an embedding lorajax knows.
  """
  _, new = _fields(config)
  if not new:
    return model
  where = f'config.new_tokens={config.new_tokens!r}'
  if not isinstance(model.tokenizer, tokenizers.Tokenizer):
    raise ValueError(f'{where} needs a Hugging Face tokenizers.Tokenizer to '
                     'add them to; this model has '
                     f'{type(model.tokenizer).__name__}')
  tables = _tables(model.config, model.params, where)
  tok = tokenizers.Tokenizer.from_str(model.tokenizer.to_str())
  for s in new:
    have = tok.token_to_id(s)
    if have is not None:
      raise ValueError(f'{where}: {s!r} is already in the vocabulary as id '
                       f'{have}; list that id in config.trainable_tokens '
                       'instead')
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True,
                                                normalized=False)
                          for s in new])
  ids = [tok.token_to_id(s) for s in new]
  old = int(model.config.vocab_size)
  size = max(old, max(ids) + 1)
  params = model.params
  keys = jax.random.split(jax.random.key(int(config.seed) + 3), len(tables))
  for key, (path, axis) in zip(keys, tables.values()):
    grown = jnp.asarray(tokens_lib.grow(spec_lib.get_by_path(params, path),
                                        size, key, axis))
    params = tokens_lib.replace_path(params, path.split('/'),
                                     lambda _, g=grown: g)
  cfg = model.config.replace(vocab_size=size)
  logging.info('new tokens %s: ids %s; vocabulary %d -> %d', list(new), ids,
               old, size)
  embedding = spec_lib.get_by_path(params, tables[EMBED][0])
  info = dict(model.info, vocab_size=size, new_tokens=list(new))
  return dataclasses.replace(model, tokenizer=tok, params=params, config=cfg,
                             module=type(model.module)(cfg),
                             embedding=embedding, info=info)


def new_token_ids(config, tokenizer: Any) -> tuple[int, ...]:
  """The ids ``config.new_tokens`` have in ``tokenizer`` (after
  ``add_new_tokens``)."""
  return tuple(tokenizer.token_to_id(s) for s in _fields(config)[1])


def for_model(config, model: Any, spec: spec_lib.LoraSpec
              ) -> tokens_lib.TrainableTokens | None:
  """The run's ``TrainableTokens`` (None when it trains no token rows).

  The rows are ``config.trainable_tokens`` then the new tokens' ids, in the
  embedding and in an untied head.

  Raises:
    ValueError: see the module docstring.
  """
  ids, new = _fields(config)
  if not (ids or new):
    return None
  where = 'config.trainable_tokens' if ids else 'config.new_tokens'
  if config.method in REFUSED_METHODS:
    raise ValueError(f'{where}: method {config.method!r} does not run '
                     f'trainable token rows (refused with {REFUSED_METHODS})')
  if model.config is None:
    raise ValueError(f'{where} needs a model whose word embedding lorajax '
                     'knows; a model.factory model has none')
  tables = _tables(model.config, model.params, where)
  indices = tuple(ids) + new_token_ids(config, model.tokenizer)
  rows = tokens_lib.TrainableTokens.of({
      name: tokens_lib.TokenTable(path, indices, axis)
      for name, (path, axis) in tables.items()})
  rows.check(model.params, where)
  resolution = spec_lib.resolve(spec, model.params)
  for name, table in rows.tables:
    action = resolution.actions[table.path]
    if action != spec_lib.FREEZE:
      rule = resolution.rule_of[table.path]
      raise ValueError(
          f'{where} trains rows of {table.path!r}, which rule {rule} '
          f'{spec.rules[rule][0]!r} -> {action!r} also trains or adapts; '
          'train the whole table or its rows, not both (PEFT refuses the '
          'same with modules_to_save)')
  return rows


def init_values(rows: tokens_lib.TrainableTokens | None,
                params: PyTree) -> dict[str, jax.Array]:
  """The values to train (``{}`` without rows), as float32 arrays."""
  if rows is None:
    return {}
  return {k: jnp.asarray(v) for k, v in rows.init(params).items()}


def check_export(config, fmt: str) -> None:
  """Raises ValueError for an export format without token rows.

  ``'lorajax'`` adapter files hold adapters and whole trained leaves; the
  rows go out as ``'peft'`` (``trainable_token_indices``) or ``'merged'``.
  """
  if fmt == 'lorajax' and wanted(config):
    raise ValueError(
        'format \'lorajax\' has no place for the trainable token rows of '
        f'config.trainable_tokens={config.get("trainable_tokens")!r} / '
        f'new_tokens={config.get("new_tokens")!r}; export \'peft\' or '
        '\'merged\'')


def write_tokenizer(directory: str | pathlib.Path, config, model: Any) -> None:
  """Adds the grown tokenizer to an exported directory (a new version,
  with its digest) when the run added tokens: ``tokenizer.json``, and the
  source checkpoint's other tokenizer files (``tokenizer_config.json``,
  chat template), so ``AutoTokenizer.from_pretrained(directory)`` has the
  new tokens and ``len(tokenizer)`` is the size to resize the base to."""
  if not _fields(config)[1]:
    return
  source = config.model.get('path')
  with digests.writing(directory) as staging:
    if source:
      for name in hf_models.TOKENIZER_FILES:
        path = pathlib.Path(source) / name
        if path.is_file() and name != 'tokenizer.json':
          (staging / name).write_bytes(path.read_bytes())
    model.tokenizer.save(str(staging / 'tokenizer.json'))
