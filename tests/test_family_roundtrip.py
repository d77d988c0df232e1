"""Round trips for every family lorajax.models.load reads, against the peers.

For a tiny random checkpoint of each family (written by transformers'
``save_pretrained``, with a small tokenizer beside it):

- the merged export (LoRA folded in) loads with transformers' Auto class and
  gives lorajax's adapted logits; its config.json is the source's with only
  the head, labels and dtype changed; the tokenizer files are copied;
- the PEFT export loads with ``PeftModel.from_pretrained`` on the class
  loaded from the same directory and gives lorajax's adapted logits;
- an adapter real PEFT made (``get_peft_model(...).save_pretrained``) on
  that class imports and gives PEFT's logits, and one made on the bare base
  model imports into the model with a head (only the key prefix differs);
- ``lora.targets='all-linear'`` / ``'default'`` select the modules PEFT's
  ``target_modules='all-linear'`` / its defaults select on the same model;
- a LoRA run on a Qwen2 directory through the config system trains,
  resumes exactly after SIGKILL, and exports an adapter PEFT reproduces.

Tolerance: float32, |Δ| <= 1e-4·(1 + |logit|). The table of measured
max |Δ| per family is printed with ``-s`` (``MEASURED``).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorajax
from lorajax import Lora, LoraSpec
import lorajax.models
from lorajax.io import hf_models
from lorajax.io import hf_targets
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.training import attach
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import config as config_lib
from lorajax.training import finished
from lorajax.training import metrics as metrics_lib
from lorajax.training import model_loading
from lorajax.training import tasks
from lorajax.training import train

import toy_models

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')
PEFT_DEFAULTS = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=48, vocab_size=67,
               initializer_range=0.2)
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, vocab_size=67, max_position_embeddings=40,
               initializer_range=0.3)
DISTIL = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=67,
              max_position_embeddings=40, initializer_range=0.3)
# name: (config class, model class, fields).
CASES = {
    'llama': ('LlamaConfig', 'LlamaForCausalLM', DECODER | dict(
        rope_parameters={'rope_type': 'default', 'rope_theta': 500000.0})),
    'mistral': ('MistralConfig', 'MistralForCausalLM',
                DECODER | dict(sliding_window=4)),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', DECODER),
    'qwen2_bare': ('Qwen2Config', 'Qwen2Model', DECODER),
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', DECODER | dict(head_dim=16)),
    'bert': ('BertConfig', 'BertForSequenceClassification',
             ENCODER | dict(num_labels=3)),
    'bert_bare': ('BertConfig', 'BertModel', ENCODER),
    'roberta': ('RobertaConfig', 'RobertaForSequenceClassification',
                ENCODER | dict(num_labels=3)),
    'roberta_bare': ('RobertaConfig', 'RobertaModel', ENCODER),
    'xlm_roberta': ('XLMRobertaConfig', 'XLMRobertaForSequenceClassification',
                    ENCODER | dict(num_labels=2)),
    'gemma': ('GemmaConfig', 'GemmaForCausalLM', DECODER | dict(head_dim=8)),
    'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM', DECODER | dict(
        head_dim=8, sliding_window=4, query_pre_attn_scalar=8)),
    'phi3': ('Phi3Config', 'Phi3ForCausalLM', DECODER | dict(pad_token_id=0)),
    'distilbert': ('DistilBertConfig', 'DistilBertForSequenceClassification',
                   DISTIL | dict(num_labels=3)),
    'distilbert_bare': ('DistilBertConfig', 'DistilBertModel', DISTIL),
}
# PEFT 'all-linear' modules lorajax does not adapt, left out of the adapters
# PEFT makes here: RobertaModel's pooler (lorajax's bare model returns the
# last hidden state and has none; refused below), and DistilBERT's
# pre_classifier, which PEFT's own sequence-classification wrapper also
# saves whole (its 'classifier' suffix matches), so 'all-linear' there
# fails in PEFT itself.
EXCLUDED = {'roberta_bare': ('pooler.dense',),
            'distilbert': ('pre_classifier',)}
AUTO = {'causal_lm': 'AutoModelForCausalLM',
        'classification': 'AutoModelForSequenceClassification',
        'base': 'AutoModel'}
IDS = np.random.default_rng(0).integers(3, 67, (2, 10))
MASK = np.ones_like(IDS)
MASK[1, 7:] = 0
# family -> {check: max |Δ|}, filled by the tests (printed at the end).
MEASURED = {}


def _write_tokenizer(directory):
  """A small WordLevel tokenizer.json + tokenizer_config.json."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {w: i for i, w in enumerate(
      ['<pad>', '<s>', '</s>', '<unk>'] + [f'w{i}' for i in range(20)])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, '<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': '</s>',
       'pad_token': '<pad>', 'unk_token': '<unk>'}))


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """name -> directory, written on first use (biases and norms perturbed
  off their zero/one init, so that a mapping error shows)."""
  made = {}

  def get(name):
    if name not in made:
      config_cls, model_cls, fields = CASES[name]
      torch.manual_seed(0)
      model = getattr(transformers, model_cls)(
          getattr(transformers, config_cls)(**fields))
      with torch.no_grad():
        for pname, p in model.named_parameters():
          if pname.endswith('bias') or 'norm' in pname.lower():
            p.add_(torch.randn_like(p) * 0.3)
      made[name] = tmp_path_factory.mktemp(name)
      model.save_pretrained(made[name])
      _write_tokenizer(made[name])
    return made[name]
  return get


def _mask(name):
  return MASK if CASES[name][1].startswith(
      ('Bert', 'Roberta', 'XLM', 'Distil')) else None


def _torch_out(model, name):
  mask = _mask(name)
  with torch.no_grad():
    out = model.eval()(input_ids=torch.tensor(IDS), attention_mask=None
                       if mask is None else torch.tensor(mask))
  return (out.logits if hasattr(out, 'logits') else
          out.last_hidden_state).numpy()


def _compare(name, check, got, want):
  """Asserts the tolerance (padding positions of hidden states aside) and
  records max |Δ|."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  mask = _mask(name)
  if want.ndim == 3 and mask is not None:
    got, want = got[mask > 0], want[mask > 0]
  delta = np.abs(got - want)
  MEASURED.setdefault(name, {})[check] = float(delta.max())
  np.testing.assert_array_less(delta, 1e-4 * (1 + np.abs(want)))


def _adapted(name, directory, targets='all-linear', seed=1):
  """The loaded model, a spec on ``targets`` and non-zero adapters."""
  model = lorajax.models.load(directory)
  hf = hf_models.hf_model(model.config, source=directory)
  regex = hf_targets.lora_targets(targets, hf, model.params)
  spec = LoraSpec([(regex, Lora(rank=2, alpha=4.0)), ('.*', 'freeze')])
  ids = jnp.asarray(IDS)
  adapters = lorajax.init(spec, model.params, jax.random.key(seed),
                          fn=model.apply, args=(ids,))
  adapters = toy_models.perturb(adapters, seed=seed, scale=0.2)
  mask = _mask(name)
  fn = lorajax.lora(model.apply, spec)
  ours = fn(model.params, adapters, ids,
            None if mask is None else jnp.asarray(mask))
  return model, spec, adapters, np.asarray(ours)


@pytest.mark.parametrize('name', CASES)
def test_merged_and_peft_exports_reproduce(checkpoints, tmp_path, name):
  directory = checkpoints(name)
  model, spec, adapters, ours = _adapted(name, directory)
  # Merged: transformers' Auto class of the head reads the folder.
  out = tmp_path / 'merged'
  hf_models.export_merged(out, model.config, model.params, adapters, spec,
                          source=directory)
  auto = getattr(transformers, AUTO[model.head])
  _compare(name, 'merged', _torch_out(auto.from_pretrained(out), name), ours)
  # config.json: the source's, only the stored dtype changed.
  source = json.loads((directory / 'config.json').read_text())
  written = json.loads((out / 'config.json').read_text())
  assert written['architectures'] == source['architectures']
  assert written['dtype'] == 'float32'
  drop = lambda c: {k: v for k, v in c.items() if k != 'dtype'}  # pylint: disable=unnecessary-lambda-assignment
  assert drop(written) == drop(source)
  for f in ('tokenizer.json', 'tokenizer_config.json'):
    assert (out / f).read_bytes() == (directory / f).read_bytes()
  assert lorajax.models.load(out).tokenizer.encode('w3 w7 w1').ids == [
      7, 11, 5]
  # PEFT: the adapter on the class read from the source directory.
  out = tmp_path / 'peft'
  peft_export.export_peft(out, model.config, spec, adapters, model.params,
                          source=directory)
  cfg = json.loads((out / 'adapter_config.json').read_text())
  assert cfg['base_model_name_or_path'] == str(directory)
  base = getattr(transformers, CASES[name][1]).from_pretrained(directory)
  theirs = peft.PeftModel.from_pretrained(base, out)
  _compare(name, 'peft_export', _torch_out(theirs, name), ours)
  # target_modules select the exported modules, no others (RobertaModel's
  # pooler.dense matched 'dense' before).
  written = safetensors.numpy.load_file(str(out / 'adapter_model.safetensors'))
  assert _lora_modules(theirs) == {
      k[len('base_model.model.'):-len('.lora_A.weight')] for k in written
      if k.endswith('.lora_A.weight')}


def _peft_made(directory, name, out, model_cls=None, **lora):
  """An adapter real PEFT makes on ``model_cls`` read from ``directory``
  (non-zero B; a perturbed classifier copy for sequence classification)."""
  cls = getattr(transformers, model_cls or CASES[name][1])
  base = cls.from_pretrained(directory)
  torch.manual_seed(3)
  head = 'SEQ_CLS' if cls.__name__.endswith('Classification') else (
      'CAUSAL_LM' if cls.__name__.endswith('CausalLM') else None)
  lora = dict(r=2, lora_alpha=4, init_lora_weights=False, task_type=head,
              target_modules='all-linear') | lora
  made = peft.get_peft_model(base, peft.LoraConfig(**lora))
  with torch.no_grad():
    for pname, p in made.named_parameters():
      if 'modules_to_save' in pname:
        p.add_(torch.randn_like(p))
  made.save_pretrained(out)
  return made


def _lora_modules(made):
  prefix = 'base_model.model.'
  return {n[len(prefix):-len('.lora_A')] for n, _ in made.named_modules()
          if n.endswith('.lora_A')}


@pytest.mark.parametrize('name', CASES)
def test_peft_made_adapter_imports_and_targets_agree(checkpoints, tmp_path,
                                                     name):
  """PEFT's 'all-linear' adapter imports and gives PEFT's logits; lorajax's
  'all-linear' and 'default' are the modules PEFT picks."""
  directory = checkpoints(name)
  extra = {'exclude_modules': sorted(EXCLUDED.get(name, ()))} if (
      name in EXCLUDED) else {}
  made = _peft_made(directory, name, tmp_path / 'made', **extra)
  want = _torch_out(made, name)
  model = lorajax.models.load(directory)
  imported = peft_format.import_peft(tmp_path / 'made', model.config,
                                     model.params, source=directory)
  mask = _mask(name)
  got = lorajax.lora(model.apply, imported.spec)(
      imported.params_for(model.params), imported.adapters, jnp.asarray(IDS),
      None if mask is None else jnp.asarray(mask))
  _compare(name, 'peft_import', got, want)
  hf = hf_models.hf_model(model.config, source=directory)
  assert set(hf_targets.target_modules('all-linear', hf)) == _lora_modules(
      made)
  if model.family not in PEFT_DEFAULTS:  # Phi-3, DistilBERT: both refuse.
    with pytest.raises(ValueError, match=f"no default.*'{model.family}'"):
      hf_targets.target_modules('default', hf)
    with pytest.raises(ValueError, match='target_modules'):
      _peft_made(directory, name, tmp_path / 'd', target_modules=None)
    return
  default = _peft_made(directory, name, tmp_path / 'd', target_modules=None)
  assert set(hf_targets.target_modules('default', hf)) == _lora_modules(
      default)


@pytest.mark.parametrize('name,bare_cls', [
    ('bert', 'BertModel'), ('roberta', 'RobertaModel'),
    ('distilbert', 'DistilBertModel'), ('qwen2', 'Qwen2Model')])
def test_adapter_of_the_bare_model_imports_into_the_head(checkpoints,
                                                         tmp_path, name,
                                                         bare_cls):
  """Was refused ('not a Linear kernel'): only the base prefix differs."""
  directory = checkpoints(name)
  # RobertaForSequenceClassification has no pooler: not adapted here.
  _peft_made(directory, name, tmp_path / 'bare', model_cls=bare_cls,
             **({'exclude_modules': ['pooler.dense']} if name == 'roberta'
                else {}))
  # PEFT's own reading: the bare adapter on the head model's base module.
  headed = getattr(transformers, CASES[name][1]).from_pretrained(directory)
  peft.PeftModel.from_pretrained(getattr(headed, headed.base_model_prefix),
                                 tmp_path / 'bare')
  want = _torch_out(headed, name)
  model = lorajax.models.load(directory)
  imported = peft_format.import_peft(tmp_path / 'bare', model.config,
                                     model.params, source=directory)
  mask = _mask(name)
  got = lorajax.lora(model.apply, imported.spec)(
      imported.params_for(model.params), imported.adapters, jnp.asarray(IDS),
      None if mask is None else jnp.asarray(mask))
  _compare(name, 'bare_adapter_import', got, want)


@pytest.mark.parametrize('name,head,arch', [
    ('bert_bare', 'classification', 'BertForSequenceClassification'),
    ('roberta_bare', 'classification', 'RobertaForSequenceClassification'),
    ('qwen2', 'base', 'Qwen2Model')])
def test_export_with_another_head_than_the_source(checkpoints, tmp_path,
                                                  name, head, arch):
  """A bare checkpoint given a new classifier (what training does with
  one) exports as the classifier class; a causal LM's base as the bare
  class."""
  directory = checkpoints(name)
  model = lorajax.models.load(directory, head=head, num_labels=3)
  params = toy_models.perturb(model.params, seed=4, scale=0.1)
  out = tmp_path / 'merged'
  hf_models.export_merged(out, model.config, params, source=directory,
                          head=head)
  written = json.loads((out / 'config.json').read_text())
  assert written['architectures'] == [arch]
  theirs = getattr(transformers, AUTO[head]).from_pretrained(out)
  assert type(theirs).__name__ == arch
  mask = _mask(name)
  ours = model.apply(params, jnp.asarray(IDS),
                     None if mask is None else jnp.asarray(mask))
  _compare(name, f'as {arch}', _torch_out(theirs, name), ours)


def test_head_adapter_into_a_bare_model_is_refused_by_name(checkpoints,
                                                           tmp_path):
  _peft_made(checkpoints('bert'), 'bert', tmp_path / 'cls',
             target_modules=['query'])
  bare = checkpoints('bert_bare')
  model = lorajax.models.load(bare)
  with pytest.raises(ValueError, match=r"'base_model\.model\.classifier\."
                     r"\w+'.*task head BertModel does not have"):
    peft_format.import_peft(tmp_path / 'cls', model.config, model.params,
                            source=bare)


def test_lora_on_a_module_lorajax_lacks_is_refused(checkpoints, tmp_path):
  """RobertaModel's pooler is not computed by lorajax (its output is the
  last hidden state), so PEFT's 'all-linear' adapter there is refused."""
  _peft_made(checkpoints('roberta_bare'), 'roberta_bare', tmp_path / 'p')
  model = lorajax.models.load(checkpoints('roberta_bare'))
  with pytest.raises(ValueError, match=r"'pooler\.dense' is not a Linear"):
    peft_format.import_peft(tmp_path / 'p', model.config, model.params,
                            source=checkpoints('roberta_bare'))


def test_exported_config_must_match_the_loaded_one(checkpoints, tmp_path):
  """A model run with another config than its source's is refused."""
  directory = checkpoints('mistral')
  model = lorajax.models.load(directory, sliding_window=None)
  with pytest.raises(ValueError, match=r'sliding_window=None, but .*'
                     r'config\.json gives 4'):
    hf_models.export_merged(tmp_path / 'm', model.config, model.params,
                            source=directory)
  assert not (tmp_path / 'm').exists()


def test_family_without_a_key_map_is_refused_by_name(checkpoints, tmp_path):
  directory = tmp_path / 'other'
  directory.mkdir()
  source = checkpoints('qwen2')
  for f in source.iterdir():
    (directory / f.name).write_bytes(f.read_bytes())
  config = json.loads((directory / 'config.json').read_text())
  (directory / 'config.json').write_text(json.dumps(
      config | {'model_type': 'starcoder2'}))
  model = lorajax.models.load(source)
  with pytest.raises(ValueError, match="model_type='starcoder2'.*no Hugging "
                     'Face key map'):
    hf_models.export_merged(tmp_path / 'm', model.config, model.params,
                            source=directory)


# --- Through the config system: train, SIGKILL, resume, export. ---

ROOT = toy_models.ROOT
CONFIG = 'configs/shakespeare_smollm2_lora.py'
_KILLER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from lorajax.training import metrics
    write = metrics.MetricWriter.write
    def patched(self, step, split, scalars):
      write(self, step, split, scalars)
      if split == 'train' and step == int(os.environ['KILL_AT']):
        os.kill(os.getpid(), signal.SIGKILL)
    metrics.MetricWriter.write = patched
    from absl import app
    from experiments import train
    sys.argv = ['train'] + sys.argv[1:]
    app.run(train.main)
''')


@pytest.fixture(scope='module')
def qwen2_run(tmp_path_factory):
  directory = toy_models.tiny_qwen2_dir(tmp_path_factory.mktemp('q2'))
  overrides = {'model.path': str(directory), 'lora.targets': 'all-linear'}
  return directory, overrides


def _losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {step: row['loss'] for step, row in rows.items()}


def _trainable(workdir, config):
  trainable, _ = tasks.build_task(config).split_params()
  folder = os.path.join(workdir, 'checkpoints')
  meta = ckpt_lib.read_meta(folder, config.num_train_steps)[1]
  out, _ = ckpt_lib.restore_trainable(folder, trainable, meta,
                                      config.num_train_steps)
  return jax.device_get(out)


def test_qwen2_run_resumes_after_sigkill_and_exports_for_peft(qwen2_run,
                                                              tmp_path):
  directory, overrides = qwen2_run
  config = toy_models.load_config('shakespeare_smollm2_lora', **overrides)
  reference = str(tmp_path / 'reference')
  summary = train.train_and_evaluate(config, reference)
  # 'all-linear': all 7 projections of both layers, PEFT's set.
  model = model_loading.load_model(config)
  method = attach.attach_method(config, model)
  adapted = lorajax.resolve(method.spec, model.params).adapted
  assert len(adapted) == 14 and summary['trainable_params'] > 0

  script = tmp_path / 'killer.py'
  script.write_text(_KILLER.format(root=ROOT))
  killed = tmp_path / 'killed'
  args = [sys.executable, str(script), f'--config={CONFIG}:smoke',
          f'--workdir={killed}'] + [f'--config.{k}={v}'
                                    for k, v in overrides.items()]
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, check=False,
                        env=dict(os.environ, KILL_AT='5'))
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert max(_losses(killed)) == 5
  resumed = train.train_and_evaluate(config, str(killed))
  # Step 4's save may still be unsealed (async) when step 5 is killed.
  assert resumed['resumed_from'] in (2, 4)
  assert _losses(killed) == _losses(reference)   # Exact, step by step.
  got, want = _trainable(str(killed), config), _trainable(reference, config)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)

  # The exported adapter in PEFT gives the run's logits.
  out = tmp_path / 'peft'
  finished.export_checkpoint(config, reference, str(out), 'peft')
  ids = np.random.default_rng(1).integers(3, 1000, (2, 12))
  ours = lorajax.lora(lambda p, x: model.module.apply({'params': p}, x),
                      method.spec)(
                          lorajax.combine(want['params'], lorajax.partition(
                              method.params, method.spec)[1]),
                          want['adapters'], jnp.asarray(ids))
  base = transformers.Qwen2ForCausalLM.from_pretrained(directory)
  theirs = peft.PeftModel.from_pretrained(base, out).eval()
  with torch.no_grad():
    theirs = theirs(input_ids=torch.tensor(ids)).logits.numpy()
  delta = np.abs(np.asarray(ours) - theirs)
  MEASURED.setdefault('qwen2 (trained run)', {})['peft_export'] = float(
      delta.max())
  np.testing.assert_array_less(delta, 1e-4 * (1 + np.abs(theirs)))
  # And merged: the source's config.json and tokenizer, transformers' logits.
  out = tmp_path / 'merged'
  finished.export_checkpoint(config, reference, str(out), 'merged')
  assert (out / 'tokenizer.json').read_bytes() == (
      directory / 'tokenizer.json').read_bytes()
  merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = merged(input_ids=torch.tensor(ids)).logits.numpy()
  delta = np.abs(np.asarray(ours) - theirs)
  MEASURED['qwen2 (trained run)']['merged'] = float(delta.max())
  np.testing.assert_array_less(delta, 1e-4 * (1 + np.abs(theirs)))


def test_unresolved_shorthand_is_refused_by_make_spec(qwen2_run):
  config = toy_models.load_config('shakespeare_smollm2_lora', **qwen2_run[1])
  with pytest.raises(ValueError, match="lora.targets='all-linear'.*attach"):
    config_lib.make_spec(config)
  model = model_loading.load_model(config)
  regex = attach.lora_targets(config, model)
  adapted = lorajax.resolve(config_lib.make_spec(config, lora_targets=regex),
                            model.params).adapted
  assert len(adapted) == 7 * model.config.num_layers


def test_zz_print_measured():
  """The family table (run with -s to see it)."""
  checks = ('merged', 'peft_export', 'peft_import', 'bare_adapter_import')
  lines = ['family | ' + ' | '.join(checks)]
  for name, row in sorted(MEASURED.items()):
    lines.append(name + ' | ' + ' | '.join(
        f'{row[c]:.1e}' if c in row else '-' for c in checks))
  print('\n'.join(lines))
