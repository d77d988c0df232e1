"""Chat supervised fine-tuning: data, loss and exact-match scoring.

Rows (``messages``, ``prompt``/``completion``, or labeled text turned into
an instruction by ``config.sft.prompt_format`` / ``label_names``) are
rendered with the checkpoint's own chat template
(``lorajax.data.chat``), trained on the assistant tokens only (by default)
and packed several a row with segment ids (``lorajax.data.packing``).

Evaluation rows hold one conversation each. A row is an exact match when
every assistant token (the answer and its end-of-turn token) is the
model's argmax given the tokens before it: that is exactly the condition
for greedy decoding from the prompt to generate the answer and stop, so the
score is the exact match of greedy generation, computed in one forward
pass (``generate_answers`` decodes for real, for inspection and checks).

Example (a tiny random model):

  >>> from lorajax.training import config as config_lib
  >>> from lorajax.training import model_loading
  >>> config = config_lib.base_config('sft')
  >>> config.model.pretrained, config.model.size = False, 'tiny'
  >>> model = model_loading.load_model(config)
  >>> rows = [{'prompt': 'Is it good?', 'completion': 'yes'}] * 3
  >>> arrays = encode_rows(config, model, rows, train=True)
  >>> arrays['segment_ids'].max(), int(arrays['mask'].sum())
  (np.int32(3), 6)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import lorajax
from lorajax.data import chat
from lorajax.data import packing
from lorajax.models import llama
from lorajax.models import lm
from lorajax.training import model_loading

Arrays = dict[str, np.ndarray]


def chat_template(config, model: model_loading.Model) -> chat.ChatTemplate:
  """``config.sft.template`` or, when empty, the checkpoint's own.

  Raises:
    ValueError: neither exists.
  """
  source = config.sft.template or model.chat_template
  if not source:
    raise ValueError(f'model {model.name!r} ships no chat template; set '
                     'config.sft.template to a Jinja chat template')
  return chat.ChatTemplate(source, dict(model.special_tokens or {}))


def _label_names(config) -> tuple[str, ...]:
  return tuple(n.strip() for n in config.sft.label_names.split(',')
               if n.strip())


def conversations(config, rows: Iterable[Mapping[str, Any]]
                  ) -> list[list[chat.Message]]:
  """Each row as a conversation (``chat.to_messages``)."""
  return [chat.to_messages(r, system=config.sft.system,
                           prompt_format=config.sft.prompt_format,
                           label_names=_label_names(config)) for r in rows]


def encode_rows(config, model: model_loading.Model,
                rows: Sequence[Mapping[str, Any]], *, train: bool) -> Arrays:
  """Rows to next-token arrays of ``config.data.max_len`` tokens.

  Training rows are packed when ``config.sft.packing``, and trained on the
  assistant tokens when ``config.sft.assistant_only`` (else on every
  token). Evaluation rows hold one conversation each, with the assistant
  mask (what ``sft_eval`` scores).

  Returns:
    ``packing``'s int32 ``inputs``, ``targets``, ``mask``, ``segment_ids``
    and ``positions``, ``[N, max_len]``.
  """
  template = chat_template(config, model)
  examples, cut = [], 0
  max_len = int(config.data.max_len)
  for messages in conversations(config, rows):
    ids, mask = chat.encode_chat(model.tokenizer, template, messages)
    if train and not config.sft.assistant_only:
      mask = np.ones_like(mask)
    cut += int(len(ids) > max_len + 1 and mask[max_len + 1:].any())
    examples.append((ids, mask))
  if cut:
    logging.warning('%d of %d conversations lose trained tokens to '
                    'data.max_len=%d', cut, len(examples), max_len)
  pad_id = model.eos_id or 0
  if train and config.sft.packing:
    out = packing.pack_examples(examples, seq_len=max_len, pad_id=pad_id)
  else:
    out = packing.pad_examples(examples, seq_len=max_len, pad_id=pad_id)
  logging.info('sft: %d conversations in %d rows of %d (%.0f%% tokens, '
               '%d trained), %d cut', len(examples), len(out['inputs']),
               max_len, 100 * packing.efficiency(out), out['mask'].sum(), cut)
  return out


def sft_apply(module: llama.Llama):
  """``apply(p, batch, *, train, rng, **inputs) -> logits [B, T, V]`` over
  packed rows (``segment_ids``, ``positions``)."""
  def apply(p, batch, *, train=False, rng=None, **inputs):
    del train, rng  # The decoder has no dropout.
    return module.apply({'params': p}, batch['inputs'],
                        segment_ids=batch['segment_ids'],
                        positions=batch['positions'], **inputs)
  return apply


def _logits_nll(apply_fn, trainable, frozen, batch, lora_rng, inputs):
  params = lorajax.combine(trainable['params'], frozen)
  logits = apply_fn(params, trainable['adapters'], batch, lora_rng=lora_rng,
                    **inputs)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  return logits, nll


def sft_loss(trainable, frozen, batch, rng, *, apply_fn, inputs_fn,
             per_token=False):
  """Mean cross entropy over trained tokens; ``loss_sum``, ``count``.
  ``per_token``: ``apply_fn`` gives the token losses
  (``tasks.nll_apply``, ``config.loss_chunk``), not logits."""
  if per_token:
    params = lorajax.combine(trainable['params'], frozen)
    nll = apply_fn(params, trainable['adapters'], batch, lora_rng=rng,
                   **inputs_fn(trainable))
  else:
    _, nll = _logits_nll(apply_fn, trainable, frozen, batch, rng,
                         inputs_fn(trainable))
  mask = batch['mask'].astype(jnp.float32)
  total, count = jnp.sum(nll * mask), jnp.sum(mask)
  return total / jnp.maximum(count, 1.0), {'loss_sum': total, 'count': count}


def sft_eval(trainable, frozen, batch, *, apply_fn, inputs_fn):
  """Token loss and greedy exact match of one conversation a row.

  Stats: ``loss_sum``/``count`` over assistant tokens, ``exact`` (rows
  whose every assistant token is the argmax) and ``examples`` (rows with
  an assistant token), padding rows (``valid`` False) weighted 0.
  """
  logits, nll = _logits_nll(apply_fn, trainable, frozen, batch, None,
                            inputs_fn(trainable))
  mask = batch['mask'].astype(bool)
  w = batch.get('valid', jnp.ones(mask.shape[:1], bool)).astype(jnp.float32)
  hit = jnp.argmax(logits, -1) == batch['targets']
  scored = jnp.any(mask, -1).astype(jnp.float32) * w
  exact = jnp.all(hit | ~mask, -1).astype(jnp.float32) * scored
  maskf = mask.astype(jnp.float32) * w[:, None]
  return {'loss_sum': jnp.sum(nll * maskf), 'count': jnp.sum(maskf),
          'exact': jnp.sum(exact), 'examples': jnp.sum(scored)}


def generate_answers(config, model: model_loading.Model, apply_fn: Any,
                     tree: Any, rows: Sequence[Mapping[str, Any]], *,
                     max_new_tokens: int = 4, batch_size: int = 16
                     ) -> list[str]:
  """Greedy answers to each row's conversation without its last reply.

  Args:
    config: the run config (template, system prompt, prompt format).
    model: the loaded model (tokenizer, eos id).
    apply_fn: ``apply_fn(tree, tokens, **kw)`` in the ``Llama`` calling
      convention (see ``lorajax.models.lm``).
    tree: its first argument (parameters, adapters).
    rows: the examples; the final assistant message is dropped and the
      generation prompt added.
    max_new_tokens: tokens generated per row (stops at eos).
    batch_size: prompts per ``lm.generate`` call (left-padded).

  Returns:
    The decoded answers, without the eos token.
  """
  template = chat_template(config, model)
  prompts = []
  for messages in conversations(config, rows):
    if messages and messages[-1]['role'] == 'assistant':
      messages = messages[:-1]
    ids, _ = chat.encode_chat(model.tokenizer, template, messages,
                              add_generation_prompt=True)
    prompts.append(ids)
  answers = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    width = max(len(p) for p in chunk)
    tokens = np.zeros((len(chunk), width), np.int32)
    mask = np.zeros((len(chunk), width), bool)
    for i, p in enumerate(chunk):
      tokens[i, width - len(p):], mask[i, width - len(p):] = p, True
    out = jax.device_get(lm.generate(
        apply_fn, tree, tokens, max_new_tokens, prompt_mask=mask,
        eos_id=model.eos_id,
        context=getattr(model.config, 'max_position', None)))
    for seq in out.tolist():
      if model.eos_id in seq:
        seq = seq[:seq.index(model.eos_id)]
      answers.append(model.tokenizer.decode(seq))
  return answers
