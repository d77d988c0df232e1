"""Chat templates: token ids equal to transformers' apply_chat_template, and
assistant-only masks."""

import json

import jinja2
import numpy as np
import pytest

from lorajax import assets
from lorajax.data import chat
from lorajax.models import bpe_tokenizer
from lorajax.models import llama_loading

transformers = pytest.importorskip('transformers')

# Templates in the styles checkpoints ship (written here for the test): a
# Llama-3 header style that starts with bos_token, and a Mistral style that
# refuses non-alternating roles with raise_exception.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_end|>\n\n' }}"
    "{{ message['content'] | trim }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}")
MISTRAL_STYLE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set sys = '' %}"
    "{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ ' [INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}")

# A template that marks assistant text with {% generation %} (as SmolLM3's).
GENERATION_TAGS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = {
    'single_turn': [
        {'role': 'user', 'content': 'Is this review positive or negative? '
                                    'A gorgeous, witty film.'},
        {'role': 'assistant', 'content': 'positive'}],
    'multi_turn_with_system': [
        {'role': 'system', 'content': 'You answer in one word.'},
        {'role': 'user', 'content': 'What is 2+2?'},
        {'role': 'assistant', 'content': 'Four.'},
        {'role': 'user', 'content': 'And 10 × 3 ?'},
        {'role': 'assistant', 'content': '  Thirty, 30 \u2014 ok\n'}],
    'multi_turn_default_system': [
        {'role': 'user', 'content': 'hello'},
        {'role': 'assistant', 'content': 'Hi! How can I help?'},
        {'role': 'user', 'content': 'Write "a haiku".'},
        {'role': 'assistant', 'content': 'Autumn moonlight\n  a worm digs'}],
}


@pytest.fixture(scope='module')
def smollm2():
  reader = llama_loading.as_reader(
      assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
  tok = bpe_tokenizer.gguf_tokenizer(reader)
  specials = bpe_tokenizer.special_tokens_map(
      tok, bpe_tokenizer.gguf_special_ids(reader))
  return tok, specials, bpe_tokenizer.gguf_chat_template(reader)


def hf_tokenizer(tmp_path, tok, specials, template):
  tok.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'PreTrainedTokenizerFast', 'chat_template': template,
       **specials}))
  return transformers.AutoTokenizer.from_pretrained(str(tmp_path))


def hf_ids(hf, messages, **kw):
  out = hf.apply_chat_template(messages, tokenize=True, **kw)
  return list(out['input_ids'] if hasattr(out, 'keys') else out)


def test_gguf_carries_smollm2_default_system_prompt(smollm2):
  _, specials, template = smollm2
  assert 'You are a helpful AI assistant named SmolLM' in template
  assert specials['bos_token'] == '<|im_start|>'
  assert specials['eos_token'] == '<|im_end|>'


@pytest.mark.parametrize('name', sorted(CONVERSATIONS))
@pytest.mark.parametrize('style', ['smollm2', 'llama3_style', 'mistral_style',
                                   'generation_tags'])
@pytest.mark.parametrize('generation_prompt', [False, True])
def test_ids_equal_transformers(tmp_path, smollm2, name, style,
                                generation_prompt):
  tok, specials, template = smollm2
  template = {'smollm2': template, 'llama3_style': LLAMA3_STYLE,
              'mistral_style': MISTRAL_STYLE,
              'generation_tags': GENERATION_TAGS}[style]
  messages = CONVERSATIONS[name]
  if generation_prompt:
    messages = messages[:-1]
  hf = hf_tokenizer(tmp_path, tok, specials, template)
  ours = chat.ChatTemplate(template, specials)
  assert ours.render(messages, add_generation_prompt=generation_prompt) == (
      hf.apply_chat_template(messages, tokenize=False,
                             add_generation_prompt=generation_prompt))
  ids, _ = chat.encode_chat(tok, ours, messages,
                            add_generation_prompt=generation_prompt)
  assert ids.tolist() == hf_ids(hf, messages,
                                add_generation_prompt=generation_prompt)


def test_mask_equals_transformers_generation_mask(tmp_path, smollm2):
  tok, specials, _ = smollm2
  hf = hf_tokenizer(tmp_path, tok, specials, GENERATION_TAGS)
  messages = CONVERSATIONS['multi_turn_with_system']
  out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                               return_assistant_tokens_mask=True)
  _, mask = chat.encode_chat(tok, chat.ChatTemplate(GENERATION_TAGS, specials),
                             messages)
  assert mask.astype(int).tolist() == list(out['assistant_masks'])


def test_load_template_reads_what_transformers_saves(tmp_path, smollm2):
  tok, specials, template = smollm2
  hf = hf_tokenizer(tmp_path / 'a', tok, specials, template) if (
      (tmp_path / 'a').mkdir() or True) else None
  hf.save_pretrained(str(tmp_path / 'b'))
  assert chat.load_template(str(tmp_path / 'a')) == template
  assert chat.load_template(str(tmp_path / 'b')) == template


def test_raise_exception_reaches_the_caller(smollm2):
  tok, specials, _ = smollm2
  bad = [{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'}]
  with pytest.raises(jinja2.TemplateError, match='must alternate'):
    chat.ChatTemplate(MISTRAL_STYLE, specials).render(bad)


def test_sandbox_refuses_unsafe_attribute_access(smollm2):
  evil = chat.ChatTemplate("{{ messages.__class__.__mro__ }}")
  with pytest.raises(jinja2.exceptions.SecurityError):
    evil.render([{'role': 'user', 'content': 'x'}])


@pytest.mark.parametrize('name', sorted(CONVERSATIONS))
def test_assistant_mask_counts_the_assistant_tokens(smollm2, name):
  tok, specials, template = smollm2
  # A reply's leading spaces may merge with the header's newline into one
  # token (trained, as transformers marks it) that the reply alone does not
  # have: strip them here.
  messages = [dict(m, content=m['content'].lstrip())
              for m in CONVERSATIONS[name]]
  ids, mask = chat.encode_chat(tok, chat.ChatTemplate(template, specials),
                               messages)
  # Each reply is its content then <|im_end|>: its own tokens plus one.
  replies = [m['content'] for m in messages if m['role'] == 'assistant']
  want = sum(len(tok.encode(r, add_special_tokens=False).ids) + 1
             for r in replies)
  assert int(mask.sum()) == want
  decoded = tok.decode(ids[mask].tolist(), skip_special_tokens=False)
  assert decoded == ''.join(r + '<|im_end|>' for r in replies)
  # Nothing of the system prompt, the user turns or the headers is trained.
  assert not mask[:np.argmax(mask)].any()


def test_generation_prompt_tokens_are_not_trained(smollm2):
  tok, specials, template = smollm2
  messages = CONVERSATIONS['single_turn'][:1]
  ids, mask = chat.encode_chat(tok, chat.ChatTemplate(template, specials),
                               messages, add_generation_prompt=True)
  assert len(ids) and not mask.any()


def test_template_that_rewrites_history_is_refused():
  # Drops every assistant turn but the last: no prefix property.
  template = chat.ChatTemplate(
      "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
      "{{ m['content'] }};{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}>{% endif %}")
  messages = CONVERSATIONS['multi_turn_default_system']
  with pytest.raises(ValueError, match='message 1 .assistant.'):
    chat.assistant_spans(template, messages)


@pytest.mark.parametrize('row, first_user', [
    ({'prompt': 'p', 'completion': 'c'}, 'p'),
    ({'messages': [{'role': 'user', 'content': 'u'},
                   {'role': 'assistant', 'content': 'a'}]}, 'u'),
    ({'text': b'great', 'label': 1}, 'Q: great'),
])
def test_rows_become_conversations(row, first_user):
  msgs = chat.to_messages(row, prompt_format='Q: {text}',
                          label_names=('negative', 'positive'))
  assert msgs[0] == {'role': 'user', 'content': first_user}
  assert msgs[-1]['role'] == 'assistant'


def test_bad_row_raises_naming_its_keys():
  with pytest.raises(ValueError, match=r"keys \['foo'\]"):
    chat.to_messages({'foo': 1})
  with pytest.raises(ValueError, match="message 0"):
    chat.ChatTemplate('x').render([{'content': 'no role'}])
