r"""Real greedy answers of a chat SFT run, before and after tuning.

  python -m experiments.sft_answers --workdir /tmp/lorajax_rt_sft --n 48

Reads the run's config from its checkpoint, generates ``--max_new_tokens``
tokens for the first ``--n`` rows of its test split with the base model
(zero-shot) and with the run's best adapter, and prints the exact-match
rate of the decoded answers (the answer, nothing else) next to a lenient
one (the first word, lower-cased, without punctuation), with a few
answers. Training's ``accuracy`` is the first of these computed in one
forward pass; this checks it by decoding.
"""

from __future__ import annotations

import re
import tempfile

from absl import app
from absl import flags

import jax
import jax.numpy as jnp

from lorajax import rewrite
from lorajax.data import sources
from lorajax.io import adapter_files
from lorajax.training import finished
from lorajax.training import model_loading
from lorajax.training import saved_run
from lorajax.training import sft

_WORKDIR = flags.DEFINE_string('workdir', None, 'The SFT run.', required=True)
_N = flags.DEFINE_integer('n', 48, 'Test rows to answer.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 4, 'Tokens per answer.')


def _first_word(text: str) -> str:
  words = re.findall(r'[a-z]+', text.lower())
  return words[0] if words else ''


def _apply(model, bundle):
  """``(apply, tree)`` for ``lm.generate``: the base, or it with ``bundle``."""
  def base(p, *args, **kwargs):
    return model.module.apply({'params': p}, *args, **kwargs)
  if bundle is None:
    return base, model.params
  inner = rewrite.lora(base, bundle.spec)

  def apply(tree, *args, **kwargs):
    return inner(tree['params'], tree['adapters'], *args, **kwargs)
  return apply, {'params': bundle.params_for(model.params),
                 'adapters': jax.tree.map(jnp.asarray, bundle.adapters)}


def main(argv):
  del argv
  config = saved_run.run_config(_WORKDIR.value)
  model = model_loading.load_model(config)
  src = sources.get_source(config.data.name, config.data.test_split,
                           config.data.dir)
  rows = [src[i] for i in range(min(_N.value, len(src)))]
  gold = [sft.conversations(config, [r])[0][-1]['content'] for r in rows]
  with tempfile.TemporaryDirectory() as out:
    finished.export_checkpoint(config, _WORKDIR.value, out, 'lorajax',
                               step='best')
    bundle = adapter_files.load_adapter(out, model.params)
    for name, b in (('zero-shot', None), ('tuned', bundle)):
      apply, tree = _apply(model, b)
      answers = sft.generate_answers(config, model, apply, tree, rows,
                                     max_new_tokens=_MAX_NEW.value)
      exact = sum(a == g for a, g in zip(answers, gold)) / len(rows)
      lenient = sum(_first_word(a) == g for a, g in zip(answers, gold)
                    ) / len(rows)
      print(f'{name}: exact {exact:.3f}, first word {lenient:.3f} on '
            f'{len(rows)} test rows; e.g. {answers[:6]}')


if __name__ == '__main__':
  app.run(main)
