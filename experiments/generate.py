r"""Generate text with SmolLM2-135M-Instruct and an adapter.

  python -m experiments.generate --adapter DIR --prompt "Write a haiku."
  python -m experiments.generate --adapter DIR --prompt "..." \
      --temperature=0.8 --top_p=0.9 --seed=1 --max_new_tokens=64

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
from lorajax.data import chat as chat_lib
from lorajax.io import adapter_files
from lorajax.io import peft_format
from lorajax.models import bpe_tokenizer
from lorajax.models import llama
from lorajax.models import llama_loading
from lorajax.models import lm

_ADAPTER = flags.DEFINE_string('adapter', None, 'Adapter directory (lorajax '
                               'or PEFT); none runs the base model.')
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
                 params: Any, *, check_weights: bool = True) -> Any:
  """A lorajax ``AdapterBundle`` or a ``PeftAdapter``, by the folder's files."""
  directory = pathlib.Path(directory)
  if (directory / adapter_files.META_FILE).exists():
    return adapter_files.load_adapter(directory, params,
                                      check_weights=check_weights)
  if (directory / peft_format.CONFIG_FILE).exists():
    return peft_format.import_peft(directory, config, params)
  raise FileNotFoundError(f'{directory} holds neither {adapter_files.META_FILE}'
                          f' (lorajax) nor {peft_format.CONFIG_FILE} (PEFT)')


def adapted_apply(config: llama.LlamaConfig, params: Any, bundle: Any
                  ) -> tuple[Callable[..., Any], Any]:
  """``(apply, tree)`` for ``lm.generate``: the model with ``bundle`` on."""
  model = llama.Llama(config)

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


def generate_text(prompt: str, *, adapter: str | None = None,
                  max_new_tokens: int = 48, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, chat: bool = True,
                  check_weights: bool = True, system: str | None = None
                  ) -> tuple[str, dict[str, float]]:
  """Returns the generated text and timing figures."""
  start = time.perf_counter()
  reader = llama_loading.as_reader(
      assets.asset_path('smollm2', llama_loading.SMOLLM2_GGUF))
  config, params = llama_loading.load_gguf_llama(reader)
  tokenizer = bpe_tokenizer.gguf_tokenizer(reader)
  specials = bpe_tokenizer.gguf_special_ids(reader)
  bundle = None if adapter is None else load_adapter(
      adapter, config, params, check_weights=check_weights)
  apply, tree = adapted_apply(config, params, bundle)
  if chat:   # The checkpoint's own template (SmolLM2: with its system prompt).
    template = chat_lib.ChatTemplate(
        bpe_tokenizer.gguf_chat_template(reader),
        bpe_tokenizer.special_tokens_map(tokenizer, specials))
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
                    top_p=top_p, rng=rng, eos_id=specials.get('eos'),
                    context=config.max_position)
  out = jax.device_get(out)[0].tolist()
  done = time.perf_counter()
  if specials.get('eos') in out:
    out = out[:out.index(specials['eos'])]
  return tokenizer.decode(out), {
      'load_s': loaded - start, 'generate_s': done - loaded,
      'prompt_tokens': int(ids.shape[1]), 'new_tokens': len(out)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  text, stats = generate_text(
      _PROMPT.value, adapter=_ADAPTER.value, max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value,
      chat=_CHAT.value, check_weights=_CHECK.value, system=_SYSTEM.value)
  print(text)
  print(f'\n[{stats["prompt_tokens"]} prompt tokens, {stats["new_tokens"]} '
        f'generated in {stats["generate_s"]:.1f}s (compilation included); '
        f'setup {stats["load_s"]:.1f}s; adapter: {_ADAPTER.value or "none"}]')


if __name__ == '__main__':
  app.run(main)
