r"""Generate text with a decoder (SmolLM2-135M-Instruct by default) and an
adapter.

  python -m experiments.generate --adapter DIR --prompt "Write a haiku."
  python -m experiments.generate --adapter DIR --prompt "..." \
      --temperature=0.8 --top_p=0.9 --seed=1 --max_new_tokens=64
  python -m experiments.generate --model ~/ckpt/Qwen2.5-0.5B-Instruct \
      --adapter DIR --prompt "..."

``--model`` is a local Hugging Face checkpoint directory of any decoder
family ``lorajax.models.load`` reads (Llama, Mistral, Qwen2/3, Gemma, Phi-3,
the MoE families): its own tokenizer, chat template and EOS ids are used.

``--adapter`` is a lorajax adapter directory (``adapter.json``, checked
against the base) or a Hugging Face PEFT directory (``adapter_config.json``);
without it the base model runs. Decoding uses the KV cache of
``lorajax.models.lm.generate``: greedy at ``--temperature=0`` (default), else
temperature and nucleus (``--top_p``) sampling. The prompt is wrapped in the
checkpoint's own chat template (the GGUF's, with SmolLM2's default system
prompt unless ``--system``) unless ``--nochat``.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from lorajax import assets
from lorajax import rewrite
import lorajax.models
from lorajax.data import chat as chat_lib
from lorajax.io import adapter_files
from lorajax.io import peft_format
from lorajax.models import bpe_tokenizer
from lorajax.models import llama
from lorajax.models import llama_loading
from lorajax.models import lm

_ADAPTER = flags.DEFINE_string('adapter', None, 'Adapter directory (lorajax '
                               'or PEFT); none runs the base model.')
_MODEL = flags.DEFINE_string('model', None, 'A Hugging Face decoder checkpoint '
                             'directory; none runs the shipped SmolLM2.')
_PROMPT = flags.DEFINE_string('prompt', 'What is LoRA?', 'The prompt.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 48, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0,
                                  '0: greedy; > 0: sampling temperature.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling threshold.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_CHAT = flags.DEFINE_bool('chat', True, 'Wrap the prompt in the chat template.')
_CHECK = flags.DEFINE_bool('check_weights', True, 'Refuse a lorajax adapter '
                           'made for other base weights.')

_SYSTEM = flags.DEFINE_string('system', None, 'A system message; none keeps '
                              "the chat template's default.")


def load_adapter(directory: str | pathlib.Path, config: llama.LlamaConfig,
                 params: Any, *, check_weights: bool = True,
                 source: str | None = None) -> Any:
  """A lorajax ``AdapterBundle`` or a ``PeftAdapter``, by the folder's files
  (``source``: the base model's Hugging Face folder, for its key names)."""
  directory = pathlib.Path(directory)
  if (directory / adapter_files.META_FILE).exists():
    return adapter_files.load_adapter(directory, params,
                                      check_weights=check_weights)
  if (directory / peft_format.CONFIG_FILE).exists():
    return peft_format.import_peft(directory, config, params, source=source,
                                   head=None if source is None else 'causal_lm')
  raise FileNotFoundError(f'{directory} holds neither {adapter_files.META_FILE}'
                          f' (lorajax) nor {peft_format.CONFIG_FILE} (PEFT)')


def adapted_apply(model: Any, params: Any, bundle: Any
                  ) -> tuple[Callable[..., Any], Any]:
  """``(apply, tree)`` for ``lm.generate``: the Flax decoder ``model`` with
  ``bundle`` on."""

  def base(p, *args, **kwargs):
    return model.apply({'params': p}, *args, **kwargs)

  if bundle is None:
    return base, params
  inner = rewrite.lora(base, bundle.spec)

  def apply(tree, *args, **kwargs):
    return inner(tree['params'], tree['adapters'], *args, **kwargs)

  tree = {'params': bundle.params_for(params),
          'adapters': jax.tree.map(jnp.asarray, bundle.adapters)}
  return apply, tree


def _decoder(model_dir: str | None) -> dict[str, Any]:
  """The base decoder: the shipped SmolLM2 GGUF or a Hugging Face folder.

  Returns ``{config, params, module, tokenizer, eos, template, specials}``.
  """
  if model_dir is None:
    reader = llama_loading.as_reader(
        assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
    config, params = llama_loading.load_gguf_llama(reader)
    tokenizer = bpe_tokenizer.gguf_tokenizer(reader)
    ids = bpe_tokenizer.gguf_special_ids(reader)
    return dict(config=config, params=params, module=llama.Llama(config),
                tokenizer=tokenizer,
                eos=() if ids.get('eos') is None else (ids['eos'],),
                template=bpe_tokenizer.gguf_chat_template(reader),
                specials=bpe_tokenizer.special_tokens_map(tokenizer, ids))
  loaded = lorajax.models.load(model_dir, head='causal_lm')
  if not loaded.is_decoder:
    raise ValueError(f'--model {model_dir}: a {loaded.family} encoder; '
                     'generation needs a decoder')
  if loaded.tokenizer is None:
    raise ValueError(f'--model {model_dir} has no tokenizer.json')
  return dict(config=loaded.config, params=loaded.params,
              module=loaded.module, tokenizer=loaded.tokenizer,
              eos=loaded.eos_ids, template=loaded.chat_template,
              specials=loaded.special_tokens or {})


def generate_text(prompt: str, *, adapter: str | None = None,
                  max_new_tokens: int = 48, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, chat: bool = True,
                  check_weights: bool = True, system: str | None = None,
                  model: str | None = None
                  ) -> tuple[str, dict[str, float]]:
  """Returns the generated text and timing figures.

  ``model``: a Hugging Face decoder directory (None: the shipped SmolLM2).

  Raises:
    ValueError: ``chat`` with a checkpoint that has no chat template, an
      encoder checkpoint, or a prompt beyond the model's context.
  """
  start = time.perf_counter()
  base = _decoder(model)
  config, params, tokenizer = base['config'], base['params'], base['tokenizer']
  bundle = None if adapter is None else load_adapter(
      adapter, config, params, check_weights=check_weights, source=model)
  apply, tree = adapted_apply(base['module'], params, bundle)
  if chat:   # The checkpoint's own template (SmolLM2: with its system prompt).
    if not base['template']:
      raise ValueError(f'{model}: no chat template in tokenizer_config.json '
                       'or chat_template.jinja; pass --nochat')
    template = chat_lib.ChatTemplate(base['template'], base['specials'])
    messages = [{'role': 'user', 'content': prompt}]
    if system is not None:
      messages.insert(0, {'role': 'system', 'content': system})
    ids, _ = chat_lib.encode_chat(tokenizer, template, messages,
                                  add_generation_prompt=True)
  else:
    ids = tokenizer.encode(prompt).ids
  ids = jnp.asarray([ids], jnp.int32)
  loaded = time.perf_counter()
  rng = jax.random.key(seed) if temperature > 0 else None
  out = lm.generate(apply, tree, ids, max_new_tokens, temperature=temperature,
                    top_p=top_p, rng=rng, eos_id=base['eos'] or None,
                    context=config.max_position)
  out = jax.device_get(out)[0].tolist()
  done = time.perf_counter()
  ends = [i for i, t in enumerate(out) if t in base['eos']]
  out = out[:ends[0]] if ends else out
  return tokenizer.decode(out), {
      'load_s': loaded - start, 'generate_s': done - loaded,
      'prompt_tokens': int(ids.shape[1]), 'new_tokens': len(out)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  text, stats = generate_text(
      _PROMPT.value, adapter=_ADAPTER.value, max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value,
      chat=_CHAT.value, check_weights=_CHECK.value, system=_SYSTEM.value,
      model=_MODEL.value)
  print(text)
  print(f'\n[{stats["prompt_tokens"]} prompt tokens, {stats["new_tokens"]} '
        f'generated in {stats["generate_s"]:.1f}s (compilation included); '
        f'setup {stats["load_s"]:.1f}s; adapter: {_ADAPTER.value or "none"}]')


if __name__ == '__main__':
  app.run(main)
