"""IA3 and LoHa adapters both ways with Hugging Face PEFT (the real peer).

On all-MiniLM-L6-v2 (fixtures of ``test_peft_interop``): a lorajax adapter
exported with ``export_peft`` loads in ``PeftModel.from_pretrained`` and
gives lorajax's logits; an adapter PEFT made (``IA3Config``,
``LoHaConfig``) imports and gives PEFT's logits.
"""

import copy
import json

import jax
import pytest

import lorajax
from lorajax import LoraSpec
from lorajax.io import peft_export
from lorajax.io import peft_format
from test_peft_interop import _base_logits  # pylint: disable=unused-import
from test_peft_interop import _close
from test_peft_interop import _minilm
from test_peft_interop import _peer_logits
from test_peft_interop import _randomize
from test_peft_interop import BERT_IDS
from test_peft_interop import BERT_MASK
from test_peft_interop import torch_bert  # pylint: disable=unused-import
from test_peft_interop import torch_mods  # pylint: disable=unused-import

# BERT's key and value have biases, which PEFT's IA3 scales too: an
# output-scaled Ia3 is exported where the module has none (the classifier
# head here), and refused elsewhere (tested below).
IA3_SPEC = LoraSpec([
    (r'.*/layer_\d/output/kernel', lorajax.Ia3(feedforward=True)),
    (r'.*/attention/(query|key)/kernel', lorajax.Ia3(feedforward=True)),
    (r'.*', 'freeze')])
LOHA_SPEC = LoraSpec([
    (r'.*/attention/(query|value)/kernel', lorajax.LoHa(rank=4, alpha=8)),
    (r'.*/layer_\d/output/kernel', lorajax.LoHa(rank=2, alpha=2)),
    (r'.*', 'freeze')])


@pytest.mark.parametrize('name,spec,scale', [('ia3', IA3_SPEC, 0.3),
                                             ('loha', LOHA_SPEC, 0.1)])
def test_export_loads_in_peft(torch_mods, torch_bert, tmp_path, name, spec,
                              scale):
  torch, _, peft = torch_mods
  config, params, apply_fn = _minilm()
  adapters = _randomize(lorajax.init(spec, params, jax.random.key(1)), 2,
                        scale)
  tuned = dict(params, classifier=_randomize(params['classifier'], 3, 0.1))
  ours = jax.jit(lorajax.lora(apply_fn, spec))(tuned, adapters, BERT_IDS,
                                              BERT_MASK)
  peft_export.export_peft(tmp_path, config, spec, adapters, tuned)
  cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert cfg['peft_type'] == name.upper()
  model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_bert), tmp_path)
  theirs = _peer_logits(torch, model.eval(), input_ids=BERT_IDS,
                        attention_mask=BERT_MASK)
  _close(ours, theirs, f'MiniLM {name} lorajax->PEFT', _base_logits('minilm'))
  back = peft_format.import_peft(tmp_path, config, params)
  kinds = lambda sp: {type(a) for _, a in sp.rules if not isinstance(a, str)}  # pylint: disable=unnecessary-lambda-assignment
  assert kinds(back.spec) == kinds(spec)
  again = jax.jit(lorajax.lora(apply_fn, back.spec))(
      back.params_for(params), back.adapters, BERT_IDS, BERT_MASK)
  _close(again, theirs, f'MiniLM {name} round trip')


def _peft_made(peft, torch, torch_bert, name):
  torch.manual_seed(0)
  if name == 'ia3':
    cfg = peft.IA3Config(task_type='SEQ_CLS',
                         target_modules=['key', 'value', 'output.dense'],
                         feedforward_modules=['output.dense'],
                         init_ia3_weights=False)
  else:
    cfg = peft.LoHaConfig(task_type='SEQ_CLS', r=4, alpha=6,
                          target_modules=['query', 'value'],
                          rank_pattern={'value': 2}, init_weights=False)
  return peft.get_peft_model(copy.deepcopy(torch_bert), cfg).eval()


@pytest.mark.parametrize('name', ['ia3', 'loha'])
def test_peft_adapter_imports(torch_mods, torch_bert, tmp_path, name):
  torch, _, peft = torch_mods
  config, params, apply_fn = _minilm()
  model = _peft_made(peft, torch, torch_bert, name)
  if name == 'loha':  # init_weights=False is small: make the effect visible.
    with torch.no_grad():
      for n, p in model.named_parameters():
        if 'hada_' in n:
          p.mul_(3.0)
  model.save_pretrained(str(tmp_path))
  theirs = _peer_logits(torch, model, input_ids=BERT_IDS,
                        attention_mask=BERT_MASK)
  imported = peft_format.import_peft(tmp_path, config, params)
  ours = jax.jit(lorajax.lora(apply_fn, imported.spec))(
      imported.params_for(params), imported.adapters, BERT_IDS, BERT_MASK)
  _close(ours, theirs, f'MiniLM {name} PEFT->lorajax', _base_logits('minilm'))


def test_mixed_methods_and_bad_ia3_shapes_are_refused(tmp_path):
  config, params, _ = _minilm()
  mixed = LoraSpec([(r'.*/attention/query/kernel', lorajax.Lora(rank=2)),
                    (r'.*/attention/value/kernel', lorajax.Ia3()),
                    (r'.*', 'freeze')])
  adapters = lorajax.init(mixed, params, jax.random.key(0))
  with pytest.raises(peft_format.PeftFormatError, match='one method'):
    peft_export.export_peft(tmp_path / 'x', config, mixed, adapters, params)
  assert not (tmp_path / 'x').exists()
  biased = LoraSpec([(r'.*/attention/key/kernel', lorajax.Ia3()),
                     (r'.*', 'freeze')])
  with pytest.raises(peft_format.PeftFormatError, match=r'with its bias'):
    peft_export.export_peft(tmp_path / 'y', config, biased,
                            lorajax.init(biased, params, jax.random.key(0)),
                            params)
  assert not (tmp_path / 'y').exists()
  spec = LoraSpec([(r'.*/attention/value/kernel',
                    lorajax.Ia3(feedforward=True)), (r'.*', 'freeze')])
  peft_export.export_peft(tmp_path / 'ok', config, spec,
                          lorajax.init(spec, params, jax.random.key(0)), params)
  cfg_path = tmp_path / 'ok' / 'adapter_config.json'
  cfg = json.loads(cfg_path.read_text())
  cfg['feedforward_modules'] = []  # the file's [1, in] says otherwise
  cfg_path.write_text(json.dumps(cfg))
  # As PEFT would have written it: no lorajax digest to catch the edit.
  (tmp_path / 'ok' / 'lorajax_digest.json').unlink()
  with pytest.raises(peft_format.PeftFormatError,
                     match=r'ia3_l has shape \(1, 384\).*not a feed-forward'):
    peft_format.import_peft(tmp_path / 'ok', config, params)
