"""Chat rows to token ids with a checkpoint's own chat template.

A chat template is the Jinja source a checkpoint ships (``chat_template`` in
``tokenizer_config.json``, a ``chat_template.jinja`` file, or
``tokenizer.chat_template`` in a GGUF file). It is rendered as Hugging Face
transformers renders it -- a sandboxed, immutable Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
``tojson`` that does not escape HTML, ``raise_exception``,
``strftime_now``, ``{% generation %}`` blocks, and the tokenizer's special tokens (``bos_token``,
``eos_token``, ...) as variables -- and the text is tokenized whole, with no
special tokens added, so the ids equal ``apply_chat_template``'s
(``tests/test_chat.py`` checks this against transformers).

Assistant spans (what an assistant-only loss trains) come from the template
itself: for the assistant message ``i``, the span runs from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])``, with trailing whitespace left out (the text
after the end-of-turn token is never generated). A template whose rendering
of a prefix of the conversation is not a prefix of the whole rendering (one
that rewrites earlier turns) is refused, naming the message.

Example:

  >>> class Chars:  # any tokenizer with encode(text) -> ids works
  ...   def encode(self, text, add_special_tokens=False):
  ...     return [ord(c) for c in text]
  >>> template = ChatTemplate(
  ...     "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\\n"
  ...     "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
  >>> messages = [{'role': 'user', 'content': 'hi'},
  ...             {'role': 'assistant', 'content': 'yo'}]
  >>> template.render(messages)
  '<user>hi\\n<assistant>yo\\n'
  >>> ids, mask = encode_chat(Chars(), template, messages)
  >>> ''.join(chr(i) for i, m in zip(ids, mask) if m)
  'yo'
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
from typing import Any, Mapping, Sequence

import jinja2
from jinja2 import sandbox
import jinja2.ext
import numpy as np

Message = dict[str, Any]
Tokenizer = Any  # encode(text) -> ids or an Encoding (.ids, .offsets).


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None,
            sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` renders its body unchanged
  (transformers marks assistant text with it; spans come from
  ``assistant_spans`` here, whatever the template marks)."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_body'), [], [],
                                  body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
  """Compiles a chat template the way transformers does (cached).

  Raises:
    jinja2.TemplateSyntaxError: the source is not a Jinja template.
  """
  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = _strftime_now
  return env.from_string(source)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A chat template and the special-token strings it may refer to.

  Attributes:
    source: the Jinja source.
    special_tokens: template variables such as ``bos_token``/``eos_token``
      (transformers passes the tokenizer's ``special_tokens_map``).
  """
  source: str
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def render(self, messages: Sequence[Message], *,
             add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """The conversation as text; ``kwargs`` are more template variables."""
    _check_messages(messages)
    variables = {**self.special_tokens, **kwargs}
    return compile_template(self.source).render(
        messages=[dict(m) for m in messages], tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **variables)


def _check_messages(messages: Sequence[Message]) -> None:
  if isinstance(messages, (str, bytes)) or not isinstance(messages,
                                                          Sequence):
    raise TypeError(f'messages must be a list of dicts, got '
                    f'{type(messages).__name__}')
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or 'role' not in m or 'content' not in m:
      raise ValueError(f'message {i} is {str(m)[:80]!r}; expected a dict '
                       "with 'role' and 'content'")


def assistant_spans(template: ChatTemplate, messages: Sequence[Message], *,
                    roles: Sequence[str] = ('assistant',)
                    ) -> tuple[str, list[tuple[int, int]]]:
  """Renders ``messages`` and finds the character span of each reply.

  Args:
    template: the chat template.
    messages: the conversation.
    roles: the roles whose messages are trained.

  Returns:
    ``(text, spans)``: the rendered conversation and ``[start, end)``
    character offsets of every message of ``roles`` in it (its content and
    end-of-turn text, trailing whitespace excluded).

  Raises:
    ValueError: the template renders an earlier prefix differently from
      the whole conversation, so no span can be cut (names the message).
  """
  text = template.render(messages)
  spans = []
  for i, m in enumerate(messages):
    if m['role'] not in roles:
      continue
    before = template.render(messages[:i], add_generation_prompt=True)
    through = template.render(messages[:i + 1])
    if not (text.startswith(through) and through.startswith(before)):
      raise ValueError(
          f'message {i} ({m["role"]}): the chat template does not render '
          'the conversation up to it as a prefix of the whole (it rewrites '
          'earlier turns), so its assistant span cannot be found; set '
          'assistant_only=False or give a template without that')
    end = len(through.rstrip())
    if end > len(before):
      spans.append((len(before), end))
  return text, spans


def _ids_offsets(tokenizer: Tokenizer, text: str
                 ) -> tuple[list[int], list[tuple[int, int]] | None]:
  try:
    enc = tokenizer.encode(text, add_special_tokens=False)
  except TypeError:
    enc = tokenizer.encode(text)
  ids = list(getattr(enc, 'ids', enc))
  offsets = getattr(enc, 'offsets', None)
  return ids, None if offsets is None else [tuple(o) for o in offsets]


def encode_chat(tokenizer: Tokenizer, template: ChatTemplate,
                messages: Sequence[Message], *,
                add_generation_prompt: bool = False,
                roles: Sequence[str] = ('assistant',)
                ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of a conversation and which of them are assistant tokens.

  The whole rendering is tokenized at once (so the ids equal transformers'
  ``apply_chat_template``); a token is an assistant token when any of its
  characters is in an assistant span (``assistant_spans``), as
  transformers marks ``{% generation %}`` text. With a tokenizer that
  gives no offsets (a plain ``encode`` returning ids) each token is taken
  as one character.

  Args:
    tokenizer: ``encode(text)`` returning ids or a ``tokenizers.Encoding``.
    template: the chat template.
    messages: the conversation.
    add_generation_prompt: end with the header of an assistant turn (for
      generation; its tokens are not assistant tokens).
    roles: the roles whose tokens are marked.

  Returns:
    ``(ids, mask)``: int32 ``[T]`` and bool ``[T]``.
  """
  if add_generation_prompt:
    text = template.render(messages, add_generation_prompt=True)
    spans = assistant_spans(template, messages, roles=roles)[1]
  else:
    text, spans = assistant_spans(template, messages, roles=roles)
  ids, offsets = _ids_offsets(tokenizer, text)
  if offsets is None:
    starts = np.arange(len(ids))
    ends = starts + 1
  else:
    starts = np.array([o[0] for o in offsets], np.int64).reshape(-1)
    ends = np.array([o[1] for o in offsets], np.int64).reshape(-1)
  mask = np.zeros(len(ids), bool)
  for a, b in spans:
    mask |= (starts < b) & (ends > a)
  return np.asarray(ids, np.int32), mask


def to_messages(row: Mapping[str, Any], *, system: str | None = None,
                prompt_format: str | None = None,
                label_names: Sequence[str] | None = None) -> list[Message]:
  """One data row as a conversation.

  Accepted rows: ``{'messages': [...]}`` (chat); ``{'prompt': str,
  'completion': str}`` (one user turn and its answer); or, with
  ``prompt_format`` and ``label_names``, a labeled example ``{'text': str,
  'label': int}`` (the prompt is ``prompt_format.format(text=...)``, the
  answer ``label_names[label]``).

  Args:
    row: the example.
    system: a system message put first (unless the row has one); None
      keeps the template's default.
    prompt_format: ``str.format`` pattern with ``{text}`` for labeled rows.
    label_names: the answer of each label.

  Raises:
    ValueError: a row of none of those forms, naming its keys.
  """
  if 'messages' in row:
    messages = [dict(m) for m in row['messages']]
  elif 'prompt' in row and 'completion' in row:
    messages = [{'role': 'user', 'content': str(row['prompt'])},
                {'role': 'assistant', 'content': str(row['completion'])}]
  elif prompt_format and label_names and 'text' in row and 'label' in row:
    label = int(row['label'])
    if not 0 <= label < len(label_names):
      raise ValueError(f'label {label} has no name in {list(label_names)}')
    text = row['text']
    text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    messages = [{'role': 'user', 'content': prompt_format.format(text=text)},
                {'role': 'assistant', 'content': label_names[label]}]
  else:
    raise ValueError(
        f'a row with keys {sorted(row)}; expected messages, prompt and '
        'completion, or text and label with a prompt format and label names')
  if system is not None and (not messages
                             or messages[0].get('role') != 'system'):
    messages.insert(0, {'role': 'system', 'content': system})
  return messages


def load_template(directory: str) -> str | None:
  """The chat template a Hugging Face checkpoint folder ships, or None.

  Looked up as transformers does: ``chat_template.jinja``, then
  ``chat_template.json``, then ``chat_template`` in
  ``tokenizer_config.json``.
  """
  folder = pathlib.Path(directory)
  if (folder / 'chat_template.jinja').exists():
    return (folder / 'chat_template.jinja').read_text(encoding='utf-8')
  for name in ('chat_template.json', 'tokenizer_config.json'):
    if (folder / name).exists():
      template = json.loads((folder / name).read_text(encoding='utf-8')).get(
          'chat_template')
      if isinstance(template, str):
        return template
  return None
