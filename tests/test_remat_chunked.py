"""config.remat and config.loss_chunk: the same losses and gradients, and
the compiled step shows the change (checkpoints in the program, fewer XLA
temporaries)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.models import attention
from lorajax.models import bert
from lorajax.models import llama
from lorajax.models import lm_head
from lorajax.models import moe
from lorajax.models import remat as remat_lib
from lorajax.runtime import cpu_attention
from lorajax.training import config as config_lib
from lorajax.training import model_loading
from lorajax.training import tasks
from lorajax.training import validate

from toy_models import set_fields

DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
RNG = np.random.default_rng(0)
# SmolLM2's vocabulary (the tiny LM's tokenizer): the logits dominate.
VOCAB = 49152


def _config(task, **fields):
  c = config_lib.base_config(task)
  c.model.pretrained, c.model.size = False, 'tiny'
  return set_fields(c, fields)


def _task(task, **fields):
  return tasks.build_task(_config(task, **fields), splits=())


def _lm_batch(b, t, *, segments=False):
  mask = (RNG.random((b, t)) > 0.3).astype(np.int32)
  mask[:, -3:] = 0   # padding at the end, and holes in the middle
  batch = {'inputs': RNG.integers(0, VOCAB, (b, t)).astype(np.int32),
           'targets': RNG.integers(0, VOCAB, (b, t)).astype(np.int32),
           'mask': mask}
  if segments:   # two packed sequences a row
    seg = np.where(np.arange(t) < t // 2, 1, 2)[None].repeat(b, 0)
    batch['segment_ids'] = seg.astype(np.int32)
    batch['positions'] = np.where(seg == 1, np.arange(t),
                                  np.arange(t) - t // 2).astype(np.int32)
  return batch


def _cls_batch(b, t):
  return {'input_ids': RNG.integers(0, 30522, (b, t)).astype(np.int32),
          'attention_mask': np.ones((b, t), np.int32),
          'token_type_ids': np.zeros((b, t), np.int32),
          'label': RNG.integers(0, 2, (b,)).astype(np.int32)}


def _loss_and_grads(task, batch):
  trainable, frozen = task.split_params()
  fn = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
  (loss, _), grads = fn(trainable, frozen, batch, jax.random.key(3))
  return float(loss), grads


def _assert_same(got, want, rel=1e-5):
  """Loss to 1e-6, every gradient leaf to ``rel`` of the largest one."""
  (loss, grads), (loss0, grads0) = got, want
  assert abs(loss - loss0) <= 1e-6 * max(1.0, abs(loss0)), (loss, loss0)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads0))
  assert scale > 0
  err = max(float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)))
  print(f'|dloss| {abs(loss - loss0):.2e}, max|dgrad| {err:.2e} '
        f'(largest |grad| {scale:.2e})')
  assert err <= rel * scale, (err, scale)


def _checkpoints(jaxpr):
  """The policies of a (closed) jaxpr's rematerialized blocks, nested ones
  too: ``checkpoint`` equations, and the LoRA rewrite's whole-block remat
  (``recompute.after_cotangent``, policy None)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('checkpoint', 'remat', 'remat2'):
      found.append(eqn.params['policy'])
    if (eqn.primitive.name == 'custom_vjp_call'
        and 'recompute_after_cotangent' in str(eqn.params['bwd'])):
      found.append(None)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found.extend(_checkpoints(inner))
  return found


# ---- config.remat -------------------------------------------------------


def _compiled(fn, *args):
  """``fn`` compiled as the training loop compiles it (XLA options)."""
  return jax.jit(fn, compiler_options=lorajax.compiler_options()).lower(
      *args).compile()


def _temp_bytes(compiled):
  return compiled.memory_analysis().temp_size_in_bytes


def test_remat_keeps_llama_gradients_and_lowers_its_temporaries():
  """A layer-heavy Llama (small vocabulary): the same loss and gradients
  under 'layer' and 'dots', and fewer XLA temporaries; if the field were
  ignored they would be equal."""
  cfg = llama.LlamaConfig.tiny(num_layers=4, hidden_size=64, head_dim=16,
                               intermediate_size=256)
  tokens = jnp.asarray(RNG.integers(0, 256, (4, 128)), jnp.int32)
  params = llama.Llama(cfg).init(jax.random.key(0), tokens[:, :4])['params']
  results, temps = {}, {}
  for remat in remat_lib.POLICIES:
    model = llama.Llama(cfg.replace(remat=remat))
    def loss(p, model=model):
      return lm_head.token_nll(cfg, p, model.apply(
          {'params': p}, tokens, hidden_only=True), tokens).mean()
    compiled = _compiled(jax.value_and_grad(loss), params)
    value, grads = compiled(params)
    results[remat], temps[remat] = (float(value), grads), _temp_bytes(compiled)
  print('temp bytes', temps)
  for remat in ('layer', 'dots'):
    _assert_same(results[remat], results['none'])
  assert temps['layer'] < 0.7 * temps['none']
  assert temps['dots'] < 0.8 * temps['none']


def test_remat_keeps_bert_gradients_with_dropout():
  """The recomputed layers of a BERT trained with dropout 0.1 draw the
  same masks: loss and gradients equal the plain ones."""
  ids = jnp.asarray(RNG.integers(0, 100, (4, 16)), jnp.int32)
  mask = jnp.ones((4, 16), jnp.int32).at[:, 12:].set(0)
  labels = jnp.asarray([0, 1, 1, 0])
  cfg = bert.BertConfig(vocab_size=100, hidden_size=32, num_layers=2,
                        num_heads=4, intermediate_size=64, max_position=32)
  params = bert.Bert(cfg).init(jax.random.key(0), ids)['params']

  def loss_and_grads(remat):
    model = bert.Bert(cfg.replace(remat=remat))
    def loss(p):
      logits = model.apply({'params': p}, ids, mask, jnp.zeros_like(ids),
                           deterministic=False,
                           rngs={'dropout': jax.random.key(5)}).logits
      logp = jax.nn.log_softmax(logits)
      return -jnp.take_along_axis(logp, labels[:, None], 1).mean()
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), grads

  want = loss_and_grads('none')
  for remat in ('layer', 'dots'):
    _assert_same(loss_and_grads(remat), want)


def test_remat_and_chunks_keep_moe_loss_and_gradients():
  """The MoE decoder (untied head) under 'layer' with a chunked loss and
  under 'dots', against its own logits and a whole cross entropy."""
  cfg = moe.MoeConfig.tiny(tie_embeddings=False)
  tokens = jnp.asarray(RNG.integers(0, 256, (2, 12)), jnp.int32)
  params = moe.MoeDecoder(cfg).init(jax.random.key(0), tokens)['params']

  def loss_and_grads(remat, chunk):
    model = moe.MoeDecoder(cfg.replace(remat=remat))
    def loss(p):
      if chunk is None:   # the model's own logits
        logp = jax.nn.log_softmax(model.apply({'params': p}, tokens), -1)
        return -jnp.take_along_axis(logp, tokens[..., None], -1).mean()
      return lm_head.token_nll(cfg, p, model.apply(
          {'params': p}, tokens, hidden_only=True), tokens,
                               chunk=chunk).mean()
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), grads

  want = loss_and_grads('none', None)
  _assert_same(loss_and_grads('layer', 10), want)
  _assert_same(loss_and_grads('dots', 0), want)


@pytest.mark.parametrize('policy,jax_policy', [('layer', None),
                                               ('dots', DOTS)])
def test_remat_is_in_the_program_of_every_family(policy, jax_policy):
  """The LoRA-wrapped loss the config path builds holds one checkpoint a
  layer, with the policy asked for (BERT, Llama; the MoE decoder's
  program too); with 'none' it holds none. A BERT classifier that pools
  [CLS] runs its last layer a second time for [CLS] alone (the
  whole-sequence run is dead code under jit), so its program holds one
  more; mean pooling (the base config's) does not."""
  for task, batch, layers, fields in (
      ('classification', _cls_batch(2, 8), 2, {}),
      ('classification', _cls_batch(2, 8), 3, {'model.pooling': 'cls'}),
      ('lm', _lm_batch(2, 8), 2, {})):
    for remat, want in (('none', 0), (policy, layers)):
      t = _task(task, remat=remat, **fields)
      trainable, frozen = t.split_params()
      jaxpr = jax.make_jaxpr(t.loss_fn)(trainable, frozen, batch,
                                        jax.random.key(0))
      found = _checkpoints(jaxpr.jaxpr)
      assert len(found) == want, (task, remat, fields)
      assert all(policy is jax_policy for policy in found)
  cfg = moe.MoeConfig.tiny(remat=policy)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = moe.MoeDecoder(cfg).init(jax.random.key(0), tokens)
  found = _checkpoints(jax.make_jaxpr(moe.MoeDecoder(cfg).apply)(
      params, tokens).jaxpr)
  assert len(found) == cfg.num_layers
  assert all(policy is jax_policy for policy in found)


def test_remat_reaches_a_checkpoint_directory(tmp_path):
  """model.path (a Hugging Face decoder) gets config.remat too."""
  pytest.importorskip('transformers')
  from toy_models import tiny_qwen2_dir  # pylint: disable=g-import-not-at-top
  directory = tiny_qwen2_dir(tmp_path)
  model = model_loading.load_model(_config('lm', remat='dots',
                                           **{'model.path': str(directory)}))
  assert model.module.config.remat == 'dots'
  assert 'remat' not in model.info   # a resume may change it


def test_bad_remat_values_are_refused_by_name():
  config = _config('lm', remat='full')
  with pytest.raises(validate.ConfigError,
                     match=r"config.remat='full': expected one of "
                           r"\('none', 'layer', 'dots'\)"):
    validate.check_config(config)
  with pytest.raises(ValueError, match=r"config.remat='full'"):
    model_loading.load_model(config)
  with pytest.raises(ValueError, match=r"remat='every'"):
    llama.LlamaConfig.tiny(remat='every')
  with pytest.raises(ValueError, match=r"remat='every'"):
    bert.BertConfig(remat='every')
  factory = _config('classification', remat='layer', **{
      'model.factory': 'lorajax.training.model_factory:example_mlp'})
  with pytest.raises(validate.ConfigError, match=r"config.remat='layer'"):
    validate.check_config(factory)
  with pytest.raises(ValueError, match=r"config.remat='layer'.*nn.remat"):
    model_loading.load_model(factory)


# ---- config.loss_chunk --------------------------------------------------


def test_chunked_lm_loss_keeps_loss_and_gradients_in_less_memory():
  """The tiny LM (tied embeddings: the head's weight also gets the
  lookup's gradient; SmolLM2's 49,152-token vocabulary, whose logits
  dominate XLA's temporaries), masked targets, T=130 not a multiple of
  the 32 positions of a 64-token chunk: the same loss and gradients, a
  fraction of the temporaries, and the same evaluation sums."""
  batch = _lm_batch(2, 130)
  results, temps, sums = {}, {}, {}
  for chunk in (0, 64):
    t = _task('lm', method='full', loss_chunk=chunk)
    trainable, frozen = t.split_params()
    args = (trainable, frozen, batch, jax.random.key(3))
    compiled = _compiled(jax.value_and_grad(t.loss_fn, has_aux=True), *args)
    (loss, stats), grads = compiled(*args)
    results[chunk], temps[chunk] = (float(loss), grads), _temp_bytes(compiled)
    sums[chunk] = float(stats['loss_sum'])
  print('temp bytes', temps)
  _assert_same(results[64], results[0])
  assert temps[64] < 0.3 * temps[0]
  evaluated = jax.jit(t.eval_fn)(trainable, frozen, batch)   # chunked
  np.testing.assert_allclose(float(evaluated['loss_sum']), sums[0],
                             rtol=1e-6)
  assert float(evaluated['count']) == float(batch['mask'].sum())


def test_chunked_sft_loss_keeps_loss_and_gradients():
  """Packed rows (segment ids, positions) of the chat task."""
  batch = _lm_batch(2, 24, segments=True)
  want = _loss_and_grads(_task('sft', method='full'), batch)
  _assert_same(_loss_and_grads(_task('sft', method='full', loss_chunk=12),
                               batch), want)


def test_chunked_loss_with_lora_on_an_untied_soft_capped_head():
  """LoRA on lm_head/kernel (and q_proj) of an untied head with Gemma2's
  final soft-cap: the chunked loss runs the adapted head, and its loss and
  adapter gradients are the unchunked ones."""
  cfg = llama.LlamaConfig.tiny(tie_embeddings=False, final_softcap=5.0)
  module = llama.Llama(cfg)
  tokens = jnp.asarray(RNG.integers(0, 256, (2, 19)), jnp.int32)
  mask = jnp.asarray(RNG.random((2, 19)) > 0.4, jnp.float32)
  params = module.init(jax.random.key(0), tokens)['params']
  spec = lorajax.LoraSpec([(r'lm_head/kernel|.*/q_proj/kernel',
                            lorajax.Lora(rank=2, alpha=4)),
                           (r'.*', lorajax.FREEZE)])
  adapters = lorajax.init(spec, params, jax.random.key(1))
  # b starts at zero: give it values, so that the adapters change the loss.
  adapters = jax.tree.map(
      lambda x: 0.05 * jax.random.normal(jax.random.key(2), x.shape),
      adapters)

  def apply(p, batch, *, train=False, rng=None, **kw):
    del train, rng
    return module.apply({'params': p}, batch['inputs'], **kw)

  logits_fn = lorajax.lora(apply, spec)
  batch = {'inputs': tokens, 'targets': tokens}

  def loss(fn, chunk):
    def f(a):
      if chunk:
        nll = fn(params, a, batch)
      else:
        logp = jax.nn.log_softmax(fn(params, a, batch), -1)
        nll = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
      return jnp.sum(nll * mask) / jnp.sum(mask)
    value, grads = jax.jit(jax.value_and_grad(f))(adapters)
    return float(value), grads

  want = loss(logits_fn, 0)
  chunked = lorajax.lora(tasks.nll_apply(apply, cfg, 8), spec)
  got = loss(chunked, 8)
  _assert_same(got, want)
  head_grad = got[1]['lm_head']['kernel']
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(head_grad))
  bare = jax.tree.map(jnp.zeros_like, adapters)
  assert abs(float(jnp.mean(chunked(params, bare, batch))) - got[0]) > 1e-4


def _build_task(config):
  return tasks.build_task(config, splits=())


@pytest.mark.parametrize('field,build,encoder_says', [
    ('loss_chunk', _build_task, 'classification has no vocabulary'),
    ('attn_chunk', model_loading.load_model,
     'classification trains an encoder'),
])
def test_bad_chunk_sizes_are_refused_by_name(field, build, encoder_says):
  """A negative size, a classifier and a ``model.factory`` model are
  refused by the config check and again where the run is built."""
  with pytest.raises(validate.ConfigError,
                     match=rf'config.{field}=-8: expected an integer >= 0'):
    validate.check_config(_config('lm', **{field: -8}))
  with pytest.raises(ValueError, match=rf'config.{field}=-8'):
    build(_config('lm', **{field: -8}))
  cls = _config('classification', **{field: 64})
  with pytest.raises(validate.ConfigError,
                     match=rf"config.{field}=64: expected 0 for task "
                           r"'classification'"):
    validate.check_config(cls)
  with pytest.raises(ValueError,
                     match=rf'config.{field}=64: task {encoder_says}'):
    build(cls)
  factory = _config('lm', **{field: 64,
                             'model.factory': 'toy_factory:make_lm'})
  with pytest.raises(validate.ConfigError, match=rf'config.{field}=64'):
    validate.check_config(factory)
  with pytest.raises(ValueError, match=rf"config.{field}=64: "
                                       r"model.factory='toy_factory:make_lm'"):
    build(factory)


def test_chunks_cover_about_the_asked_tokens():
  assert lm_head.chunk_positions(8, 256, 512) == 64
  assert lm_head.chunk_positions(1, 2048, 512) == 512
  assert lm_head.chunk_positions(16, 256, 8) == 1     # at least a position
  assert lm_head.chunk_positions(1, 100, 512) == 100  # at most the sequence


# ---- config.attn_chunk --------------------------------------------------


def test_attention_in_blocks_keeps_outputs_and_gradients():
  """Grouped queries, a prefix, padding holes and two packed segments, T=37
  not a multiple of the 8-query blocks (the last block is padded): the
  same logits and gradients as attention over all queries at once."""
  cfg = llama.LlamaConfig.tiny(num_layers=2, num_heads=4, num_kv_heads=2)
  b, t = 2, 37
  tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
  seg = np.where(np.arange(t) < 20, 1, 2)[None].repeat(b, 0)
  pad = np.ones((b, t), np.int32)
  pad[0, :5] = 0   # left padding: rows with no visible key
  kw = dict(attention_mask=jnp.asarray(pad), segment_ids=jnp.asarray(seg))
  params = llama.Llama(cfg).init(jax.random.key(0), tokens[:, :4])['params']
  prefix = 0.1 * jax.random.normal(
      jax.random.key(1), (cfg.num_layers, 2, 3, cfg.num_kv_heads,
                          cfg.head_dim))
  results = {}
  for chunk in (0, 8, 64):
    model = llama.Llama(cfg.replace(attn_chunk=chunk))
    def loss(p, pre, model=model):
      logits = model.apply({'params': p}, tokens, prefix=pre, **kw)
      return jnp.mean(jnp.square(logits)), logits
    (value, logits), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            params, prefix)
    assert bool(jnp.all(jnp.isfinite(logits)))
    results[chunk] = (float(value), grads, logits)
  for chunk in (8, 64):
    np.testing.assert_allclose(results[chunk][2], results[0][2], atol=2e-5)
    _assert_same(results[chunk][:2], results[0][:2])


@pytest.mark.parametrize('with_prefix', [False, True])
def test_causal_blocks_keep_outputs_and_gradients(monkeypatch, with_prefix):
  """Without attn_chunk, a causal decoder on the CPU runs its queries in
  blocks over the keys up to each block's last query: left padding, two
  packed segments, grouped queries, T=37 in blocks of 10 (the last one
  shorter), with and without a prefix: the same logits at every real
  position and the same gradients of a loss over the real positions, as
  attention over all queries at once."""
  monkeypatch.setenv(cpu_attention.SWITCH, 'xla')   # XLA's blocks
  cfg = llama.LlamaConfig.tiny(num_layers=2, num_heads=4, num_kv_heads=2)
  b, t = 2, 37
  tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
  seg = np.where(np.arange(t) < 20, 1, 2)[None].repeat(b, 0)
  pad = np.ones((b, t), np.int32)
  pad[0, :5] = 0   # left padding: rows that see no key
  real = jnp.asarray(pad, bool)
  kw = dict(attention_mask=jnp.asarray(pad), segment_ids=jnp.asarray(seg))
  params = llama.Llama(cfg).init(jax.random.key(0), tokens[:, :4])['params']
  prefix = None
  if with_prefix:
    prefix = 0.1 * jax.random.normal(
        jax.random.key(1), (cfg.num_layers, 2, 3, cfg.num_kv_heads,
                            cfg.head_dim))
  model = llama.Llama(cfg)
  results = {}
  for block, blocks in ((0, 1), (8, 4)):
    monkeypatch.setattr(attention, 'CAUSAL_BLOCK', block)
    assert attention.causal_blocks(t) == blocks

    def loss(p, pre):
      logits = model.apply({'params': p}, tokens, prefix=pre, **kw)
      err = jnp.sum(jnp.square(logits) * real[..., None]) / jnp.sum(real)
      return err, logits
    (value, logits), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            params, prefix)
    results[block] = (float(value), grads, np.asarray(logits)[pad > 0])
  np.testing.assert_allclose(results[8][2], results[0][2], atol=2e-5)
  _assert_same(results[8][:2], results[0][:2])


def test_causal_blocks_skip_the_hidden_scores(monkeypatch):
  """1 x 256 tokens, 4 causal blocks: XLA counts fewer FLOPs (the scores
  above the diagonal are mostly never formed) and the step keeps fewer
  temporaries; the loss is the same."""
  monkeypatch.setenv(cpu_attention.SWITCH, 'xla')   # XLA's blocks
  cfg = llama.LlamaConfig.tiny(num_layers=2)
  tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (1, 256)), jnp.int32)
  params = llama.Llama(cfg).init(jax.random.key(0), tokens[:, :4])['params']
  model = llama.Llama(cfg)
  values, flops, temps = {}, {}, {}
  for block in (0, 64):
    monkeypatch.setattr(attention, 'CAUSAL_BLOCK', block)

    def loss(p):
      return lm_head.token_nll(cfg, p, model.apply(
          {'params': p}, tokens, hidden_only=True), tokens).mean()
    compiled = _compiled(jax.value_and_grad(loss), params)
    values[block] = float(compiled(params)[0])
    cost = compiled.cost_analysis()
    flops[block] = (cost[0] if isinstance(cost, (list, tuple))
                    else cost)['flops']
    temps[block] = _temp_bytes(compiled)
  print('flops', flops, 'temp bytes', temps)
  assert abs(values[64] - values[0]) <= 1e-5 * abs(values[0])
  assert flops[64] < flops[0]
  assert temps[64] < temps[0]


def test_attention_in_blocks_lowers_the_temporaries_of_a_long_sequence(
    monkeypatch):
  """1 x 1024 tokens through a tiny Llama with remat per layer: the
  compiled step's temporaries fall with 128-query blocks (the scores of
  all queries, [heads, T, T], dominate them otherwise); the same loss."""
  monkeypatch.setenv(cpu_attention.SWITCH, 'xla')   # XLA's attention
  monkeypatch.setattr(attention, 'CAUSAL_BLOCK', 0)   # all queries at once
  cfg = llama.LlamaConfig.tiny(num_layers=2, remat='layer')
  tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (1, 1024)), jnp.int32)
  params = llama.Llama(cfg).init(jax.random.key(0), tokens[:, :4])['params']
  values, temps = {}, {}
  for chunk in (0, 128):
    model = llama.Llama(cfg.replace(attn_chunk=chunk))
    def loss(p, model=model):
      return lm_head.token_nll(cfg, p, model.apply(
          {'params': p}, tokens, hidden_only=True), tokens).mean()
    compiled = _compiled(jax.value_and_grad(loss), params)
    values[chunk] = float(compiled(params)[0])
    temps[chunk] = _temp_bytes(compiled)
  print('temp bytes', temps)
  assert abs(values[128] - values[0]) <= 1e-5 * abs(values[0])
  assert temps[128] < 0.5 * temps[0]


def test_attn_chunk_reaches_the_decoder():
  model = model_loading.load_model(_config('lm', attn_chunk=256))
  assert model.config.attn_chunk == 256
  with pytest.raises(ValueError, match=r'attn_chunk=-2'):
    llama.LlamaConfig.tiny(attn_chunk=-2)


def test_chunked_loss_with_a_frozen_head_recomputes_no_logits():
  """LoRA leaves the head frozen: each chunk's gradient with respect to the
  hidden states is formed in the forward pass, so the step has no
  rematerialized head (full fine-tuning trains the tied head and keeps the
  recomputing path); loss and gradients are the unchunked ones, in less
  memory."""
  batch = _lm_batch(2, 130)
  results, temps, blocks = {}, {}, {}
  for method in ('lora', 'full'):
    for chunk in (0, 64):
      t = _task('lm', method=method, loss_chunk=chunk)
      trainable, frozen = t.split_params()
      args = (trainable, frozen, batch, jax.random.key(3))
      fn = jax.value_and_grad(t.loss_fn, has_aux=True)
      blocks[method, chunk] = len(_checkpoints(jax.make_jaxpr(fn)(*args)))
      compiled = _compiled(fn, *args)
      (loss, _), grads = compiled(*args)
      results[method, chunk] = (float(loss), grads)
      temps[method, chunk] = _temp_bytes(compiled)
  print('rematerialized blocks', blocks, 'temp bytes', temps)
  _assert_same(results['lora', 64], results['lora', 0])
  assert blocks['lora', 64] == blocks['lora', 0]
  assert blocks['full', 64] > blocks['full', 0]
  assert temps['lora', 64] < 0.3 * temps['lora', 0]
