"""Files lorajax writes prove themselves and are written whole (issue 17).

The file half of the fault-injection suite (tests/test_run_safety.py has
the run half): adapter files and PEFT directories carry a digest, checked
at load; a SIGKILL or a full disk in the middle of an export leaves the
old version or nothing; prepared data caches are checked and rebuilt; a
prompt longer than the model's context is refused before anything is
allocated; a checkpoint the disk cannot take is named and the previous one
kept. Tiny random Llama (d=32, 2 layers) throughout.
"""

import contextlib
import errno
import functools
import glob
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from safetensors import numpy as st_numpy
import tensorflow_datasets as tfds

import lorajax
from lorajax import checksums
from lorajax.data import builders
from lorajax.data import files as files_lib
from lorajax.data import sources
from lorajax.io import adapter_files
from lorajax.io import digests
from lorajax.io import hf_models
from lorajax.io import peft_export
from lorajax.io import peft_format
from lorajax.models import llama
from lorajax.models import lm
from lorajax.training import checkpoint as ckpt_lib
from lorajax.training import integrity
from lorajax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.array([[1, 50, 34, 31, 25, 13]], np.int32)
SPEC = lorajax.LoraSpec([(r'layers_\d+/attn/(q|v)_proj/kernel',
                          lorajax.Lora(rank=2, alpha=4)), ('.*', 'freeze')])


@functools.cache
def _tiny(seed=0):
  """``(config, params, apply_fn, adapters)``: adapters with nonzero b."""
  config = llama.LlamaConfig.tiny()
  model = llama.Llama(config)
  params = jax.jit(model.init)(jax.random.key(0), IDS)['params']
  apply_fn = lambda p, *a, **k: model.apply({'params': p}, *a, **k)
  adapters = lorajax.init(SPEC, params, jax.random.key(1), fn=apply_fn,
                          args=(IDS,))
  rng = np.random.default_rng(seed)
  adapters = jax.tree.map(
      lambda x: np.asarray(x) + 0.2 * rng.standard_normal(np.shape(x)).astype(
          np.float32), adapters)
  return config, params, apply_fn, adapters


def _flip_bit(path, offset=None):
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2 if offset is None else offset] ^= 0x01
  open(path, 'wb').write(bytes(data))


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same(a, b):
  la, lb = _leaves(a), _leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y)
                                    for x, y in zip(la, lb))


# ---- adapter files and PEFT directories carry a digest ------------------------


@pytest.mark.parametrize('fmt', ['safetensors', 'orbax'])
def test_adapter_file_bit_flip_is_refused_naming_the_file(fmt, tmp_path):
  config, params, _, adapters = _tiny()
  del config
  out = tmp_path / 'ad'
  adapter_files.save_adapter(out, SPEC, adapters, params, format=fmt)
  assert (out / digests.DIGEST_FILE).is_file()
  tensor = max((p for p in out.rglob('*') if p.is_file()
                and p.name != digests.DIGEST_FILE), key=os.path.getsize)
  _flip_bit(tensor)
  with pytest.raises(adapter_files.AdapterFileError) as err:
    adapter_files.load_adapter(out, params)
  message = str(err.value)
  assert (f'{out}/{tensor.relative_to(out)} has another sha256 than when it '
          'was written') in message
  assert 'lorajax-export' in message   # The command that writes it again.
  _flip_bit(tensor)                      # Back as it was: loads.
  _truncate(out / adapter_files.META_FILE)
  with pytest.raises(adapter_files.AdapterFileError,
                     match=f'{out}/adapter.json has .* bytes.*truncated'):
    adapter_files.load_adapter(out, params)


def test_adapter_saved_without_digest_loads_with_a_warning(tmp_path, caplog):
  """What an older lorajax wrote: loaded, with a warning that it cannot be
  fully verified (its safetensors sha256 in adapter.json still is)."""
  _, params, _, adapters = _tiny()
  out = tmp_path / 'ad'
  adapter_files.save_adapter(out, SPEC, adapters, params)
  os.remove(out / digests.DIGEST_FILE)
  bundle = adapter_files.load_adapter(out, params)
  assert _same(bundle.adapters, adapters)
  assert f'{out} has no lorajax_digest.json (saved by a lorajax from before '\
      'digests)' in caplog.text


def test_peft_dir_digest_is_ignored_by_peft_and_checked_by_lorajax(tmp_path):
  """The peer: PeftModel.from_pretrained loads a lorajax export with its
  digest file and computes lorajax's logits; a directory real PEFT saved
  (no digest) imports as before; a bit flip in lorajax's export is refused
  naming the file."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  config, params, apply_fn, adapters = _tiny()
  base_dir = hf_models.export_merged(tmp_path / 'base', config, params)
  out = peft_export.export_peft(tmp_path / 'peft', config, SPEC, adapters,
                                params)
  assert sorted(os.listdir(out)) == sorted([digests.DIGEST_FILE,
                                            peft_format.CONFIG_FILE,
                                            peft_format.WEIGHTS_FILE])
  want = np.asarray(lorajax.lora(apply_fn, SPEC)(params, adapters, IDS))
  model = transformers.LlamaForCausalLM.from_pretrained(
      str(base_dir), attn_implementation='eager', dtype=torch.float32)
  peer = peft.PeftModel.from_pretrained(model, str(out)).eval()
  with torch.no_grad():
    theirs = peer(input_ids=torch.tensor(IDS, dtype=torch.long)).logits
  np.testing.assert_allclose(want, theirs.numpy(), atol=1e-4, rtol=1e-4)
  base = np.asarray(apply_fn(params, IDS))
  assert np.abs(want - base).max() > 1e-2   # The adapter does something.
  # Saved by PEFT itself: no digest, imports normally.
  peer.save_pretrained(str(tmp_path / 'by_peft'))
  assert not (tmp_path / 'by_peft' / digests.DIGEST_FILE).exists()
  by_peft = peft_format.import_peft(tmp_path / 'by_peft', config, params)
  got = lorajax.lora(apply_fn, by_peft.spec)(params, by_peft.adapters, IDS)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # A bit flip in lorajax's export is refused, naming the file.
  _flip_bit(out / peft_format.WEIGHTS_FILE)
  with pytest.raises(peft_format.PeftFormatError) as err:
    peft_format.import_peft(out, config, params)
  assert (f'{out}/{peft_format.WEIGHTS_FILE} has another sha256 than when '
          'it was written') in str(err.value)
  assert f'delete {out}/{digests.DIGEST_FILE}' in str(err.value)


# ---- a SIGKILL or a full disk in the middle of an export ----------------------

# Exports the tiny model's adapters with other numbers (seed 1) and kills
# itself with SIGKILL either while the tensor file is being written (half
# of it on disk) or just before the finished version is renamed into place.
_KILLER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    fmt, where, out = sys.argv[1:4]
    from safetensors import numpy as st_numpy
    import test_run_safety_files as t
    config, params, _, adapters = t._tiny(seed=1)
    save = st_numpy.save_file
    def killed_writing(tensors, path, *args, **kwargs):
      save(tensors, path, *args, **kwargs)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
      os.kill(os.getpid(), signal.SIGKILL)
    rename = os.rename
    def killed_swapping(src, dst):
      if '.partial-' in os.fspath(src):
        os.kill(os.getpid(), signal.SIGKILL)
      rename(src, dst)
    if where == 'write':
      st_numpy.save_file = killed_writing
    else:
      os.rename = killed_swapping
    t.export(fmt, out, config, params, adapters)
''')


def export(fmt, out, config, params, adapters):
  """Writes ``adapters`` in export format ``fmt`` to ``out``."""
  if fmt == 'lorajax':
    adapter_files.save_adapter(out, SPEC, adapters, params)
  elif fmt == 'peft':
    peft_export.export_peft(out, config, SPEC, adapters, params)
  else:
    hf_models.export_merged(out, config, params, adapters, SPEC)


def _load(fmt, out, config, params):
  """What a later reader gets: the adapter (lorajax, peft) or the merged
  checkpoint's tensors."""
  if fmt == 'lorajax':
    return adapter_files.load_adapter(out, params).adapters
  if fmt == 'peft':
    return peft_format.import_peft(out, config, params).adapters
  assert digests.verify(out)
  return st_numpy.load_file(str(out / 'model.safetensors'))


@pytest.mark.parametrize('fmt,where', [('lorajax', 'write'),
                                       ('lorajax', 'swap'), ('peft', 'swap'),
                                       ('merged', 'write')])
def test_sigkill_during_export_leaves_the_old_version_or_none(fmt, where,
                                                              tmp_path):
  config, params, _, adapters = _tiny()
  out = tmp_path / 'export'
  export(fmt, out, config, params, adapters)
  old = _load(fmt, out, config, params)
  script = tmp_path / 'killer.py'
  script.write_text(_KILLER.format(root=ROOT, tests=os.path.join(ROOT,
                                                                 'tests')))
  proc = subprocess.run([sys.executable, str(script), fmt, where, str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  # The killed writer's staging folder is left, and known to be stale.
  staged = list(tmp_path.glob('.export.partial-*'))
  assert len(staged) == 1 and digests.stale_staging(out) == staged
  if where == 'write':       # Killed mid-file: the old version, intact.
    assert _same(_load(fmt, out, config, params), old)
  else:                      # Between the two renames: no target at all,
    assert not out.exists()  # and the old version kept beside it.
    previous = digests.leftovers(out)
    assert len(previous) == 1
    assert _same(_load(fmt, previous[0], config, params), old)
    if fmt == 'lorajax':
      with pytest.raises(adapter_files.AdapterFileError,
                         match='a save into it was interrupted; the version '
                               f'it replaced is {previous[0]}'):
        adapter_files.load_adapter(out, params)
  # A later export succeeds and is the new version.
  _, _, _, newer = _tiny(seed=1)
  export(fmt, out, config, params, newer)
  assert not _same(_load(fmt, out, config, params), old)
  # ... and removes what the killed one left staged.
  assert not list(tmp_path.glob('.export.partial-*'))


def test_only_a_dead_writers_staging_folder_of_this_host_is_removed(
    tmp_path):
  """A new write of ``out`` removes ``.out.partial-<pid>@<host>~*`` of a
  process that no longer runs here, and keeps those of a running process,
  of another host, and of an older lorajax (no pid in the name)."""
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  host = socket.gethostname()
  names = {'dead': f'.out.partial-{dead.pid}@{host}~abc',
           'running': f'.out.partial-{os.getppid()}@{host}~abc',
           'other host': f'.out.partial-{dead.pid}@{host}-elsewhere~abc',
           'older': '.out.partial-k2j4x9',
           'other target': f'.out2.partial-{dead.pid}@{host}~abc'}
  for name in names.values():
    (tmp_path / name).mkdir()
    (tmp_path / name / 'model.safetensors').write_bytes(b'0' * 64)
  assert digests.stale_staging(tmp_path / 'out') == [tmp_path / names['dead']]
  with digests.writing(tmp_path / 'out') as staging:
    (staging / 'a.txt').write_text('new')
  left = {p.name for p in tmp_path.iterdir()}
  assert left == {'out'} | set(names.values()) - {names['dead']}
  assert (tmp_path / 'out' / 'a.txt').read_text() == 'new'


@pytest.mark.parametrize('fmt', ['lorajax', 'peft', 'merged'])
def test_full_disk_during_export_names_the_path_and_keeps_the_old(
    fmt, tmp_path, monkeypatch):
  """ENOSPC while the tensor file is written (a write hook: half the bytes
  land, then the disk is full)."""
  config, params, _, adapters = _tiny()
  out = tmp_path / 'export'
  export(fmt, out, config, params, adapters)
  old = _load(fmt, out, config, params)
  save = st_numpy.save_file

  def full(tensors, path, *args, **kwargs):
    save(tensors, path, *args, **kwargs)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  monkeypatch.setattr(st_numpy, 'save_file', full)
  _, _, _, newer = _tiny(seed=1)
  with pytest.raises(OSError, match=f'cannot write {out}: No space left on '
                     r'device \(.*\.safetensors\); it was left as it was'):
    export(fmt, out, config, params, newer)
  monkeypatch.undo()
  assert _same(_load(fmt, out, config, params), old)
  assert not glob.glob(str(tmp_path / '.export.*'))   # No staging left.


# ---- prepared data caches -----------------------------------------------------


def test_damaged_converted_data_file_is_converted_again(tmp_path, caplog):
  data = tmp_path / 'rows.jsonl'
  data.write_text(''.join(json.dumps({'text': f'row {i}', 'label': i % 2})
                          + '\n' for i in range(40)))
  fields = files_lib.Fields(text='text', label='label')
  first = files_lib.convert([str(data)], '', fields, cache_root=tmp_path / 'c')
  rows = [first[i] for i in range(len(first))]
  assert checksums.check_folder(first.folder) == []
  records = os.path.join(first.folder, 'rows.array_record')
  _flip_bit(records)
  again = files_lib.convert([str(data)], '', fields, cache_root=tmp_path / 'c')
  assert again.folder == first.folder
  assert [again[i] for i in range(len(again))] == rows
  assert (f'converted data {first.folder} is damaged: rows.array_record has '
          'another sha256') in caplog.text
  assert glob.glob(first.folder + '.damaged-*')   # Moved aside, not deleted.


def test_truncated_prepared_tfds_shard_is_rebuilt_from_the_wheel(tmp_path,
                                                                 caplog):
  data_dir = str(tmp_path / 'tfds')
  builder = builders.prepare('rotten_tomatoes', data_dir)
  first = builder.as_data_source('validation')
  want = [first[i]['text'] for i in (0, len(first) - 1)]
  folder = str(builder.data_dir)
  assert checksums.check_folder(folder) == []
  shard = glob.glob(os.path.join(folder, '*-validation.array_record*'))[0]
  _truncate(shard)
  builder = builders.prepare('rotten_tomatoes', data_dir)
  again = builder.as_data_source('validation')
  assert [again[i]['text'] for i in (0, len(again) - 1)] == want
  assert (f'prepared data {folder} is damaged: {os.path.basename(shard)} '
          'has') in caplog.text and 'truncated' in caplog.text
  assert len(os.listdir(os.path.join(data_dir, 'damaged'))) == 1


# ---- a prompt longer than the model's context ---------------------------------


def test_prompt_beyond_the_context_is_refused_before_any_allocation():
  config, params, apply_fn, _ = _tiny()
  prompt = ('All the world is a stage. ' * 4000)[:100_000]
  tokens = np.frombuffer(prompt.encode(), np.uint8)[None].astype(np.int32)

  def never(*args, **kwargs):
    raise AssertionError('the model ran on a prompt beyond its context')

  with pytest.raises(ValueError) as err:
    lm.generate(never, params, tokens, 16, context=config.max_position)
  assert ("the prompt has 100000 tokens and 16 new tokens were asked for: "
          "100016 tokens exceed the model's context of 128 tokens"
          in str(err.value))
  # Exactly the context fits and runs; one token more is refused.
  fits = tokens[:, :config.max_position - 8] % config.vocab_size
  out = lm.generate(apply_fn, params, fits, 8, context=config.max_position)
  assert out.shape == (1, 8)
  with pytest.raises(ValueError, match='shorten the prompt to at most 120'):
    lm.generate(never, params, tokens[:, :121], 8,
                context=config.max_position)


# ---- a full disk during a checkpoint save -------------------------------------


@contextlib.contextmanager
def _file_size_limit(nbytes):
  """Writes past ``nbytes`` in one file fail (EFBIG), as on a full disk:
  TensorStore's own C++ writes included, which no Python hook reaches."""
  old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize('async_save', [False, True])
def test_failed_checkpoint_write_names_the_file_and_keeps_the_previous(
    async_save, tmp_path):
  state = step_lib.create_state(
      {'w': jax.random.normal(jax.random.key(0), (128, 256))},
      optax.adam(1e-3), 0)
  meta = {'shapes': ckpt_lib.tree_shapes(state.trainable), 'model': {},
          'spec': {}, 'data_state': {}}
  ckpt_dir = str(tmp_path / 'checkpoints')
  manager = ckpt_lib.make_manager(ckpt_dir, async_save=async_save)
  ckpt_lib.save(manager, state, meta)                  # Step 0.
  ckpt_lib.wait_until_finished(manager)
  with pytest.raises(integrity.WriteFailed) as err:
    with _file_size_limit(20_000):     # The tensor file has ~120 kB.
      ckpt_lib.save(manager, state._replace(step=state.step + 5), meta)
      ckpt_lib.wait_until_finished(manager)
  manager.close()
  message = str(err.value)
  assert err.value.errno == errno.EFBIG
  assert f'in {ckpt_dir}: File too large ({ckpt_dir}/5.orbax-checkpoint-tmp/'\
      in message
  assert 'The checkpoints written before it are intact' in message
  notes = []
  manager = ckpt_lib.make_manager(ckpt_dir, async_save=False)
  restored, stored = ckpt_lib.restore_latest(manager, state, meta,
                                             note=notes.append)
  assert stored['step'] == 0 and int(restored.step) == 0, notes
  assert integrity.verify(os.path.join(ckpt_dir, '0')) is None
  ckpt_lib.save(manager, state._replace(step=state.step + 5), meta)
  manager.close()                      # Space again: step 5 is written.
  assert integrity.verify(os.path.join(ckpt_dir, '5')) is None


def test_truncated_catalog_shard_is_named_with_the_command_that_fixes_it(
    tmp_path):
  """A TFDS dataset a user prepared (no digest of lorajax's): the read that
  hits the damage names the dataset, its folder and the command."""
  data_dir = str(tmp_path / 'tfds')
  builders.prepare('rotten_tomatoes', data_dir)
  raw = tfds.data_source('rotten_tomatoes', split='train', data_dir=data_dir,
                         download=False)
  source = sources.Source(raw, lambda ex: ex, name='rotten_tomatoes',
                          split='train')
  folder = str(raw.dataset_info.data_dir)
  _truncate(glob.glob(os.path.join(folder, '*-train.array_record*'))[0])
  with pytest.raises(ValueError) as err:
    source[len(source) - 1]
  message = str(err.value)
  assert f"rotten_tomatoes split 'train': example {len(source) - 1} cannot "\
      f'be read from the prepared files in {folder}' in message
  assert 'tfds build rotten_tomatoes --file_format=array_record' in message


def test_export_into_the_working_directory_or_a_symlink_fills_it_in_place(
    tmp_path, monkeypatch):
  """Such a target is not renamed away (a shell in it would be left in a
  deleted folder, a symlink would become a folder); a person's own file in
  it is kept."""
  _, params, _, adapters = _tiny()
  here = tmp_path / 'here'
  here.mkdir()
  (here / 'NOTES.md').write_text('mine')
  monkeypatch.chdir(here)
  adapter_files.save_adapter('.', SPEC, adapters, params)
  assert os.path.samefile(os.getcwd(), here)
  assert (here / 'NOTES.md').read_text() == 'mine'
  assert _same(adapter_files.load_adapter(here, params).adapters, adapters)
  link = tmp_path / 'link'
  link.symlink_to(here, target_is_directory=True)
  _, _, _, newer = _tiny(seed=1)
  adapter_files.save_adapter(link, SPEC, newer, params)
  assert link.is_symlink()
  assert _same(adapter_files.load_adapter(here, params).adapters, newer)
