"""The SFT trainer: completion-only loss, resume exactness, 8 devices vs 1, Adam's nu in the
checkpoint, init_from another run, and the accuracy evaluation."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from curvopt import data
from curvopt import models
from curvopt import train
from curvopt.data import _task_generators
from curvopt.train import _sft
from curvopt.train import _step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def sft_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds_sft'))
  for task in ('arithmetic', 'reversal'):
    data.task_source(task, 'test', data_dir=data_dir)
  return data_dir


@pytest.fixture(scope='module')
def sft_config(sft_data_dir):
  """configs/sft.py:test on the module's data dir, with overrides 'a.b' = value."""

  def make(**overrides):
    config = train.load_config(os.path.join(REPO, 'configs', 'sft.py'), 'test')
    config.data.data_dir = sft_data_dir
    config.update_from_flattened_dict(overrides)
    return config

  return make


@pytest.fixture(scope='module')
def straight_run(sft_config, tmp_path_factory):
  """An uninterrupted test-variant run (greedy and sampled evaluation on); workdir, result."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  return workdir, train.train_sft(sft_config(**{'eval.samples_per_prompt': 2}), workdir)


def _final_state(workdir):
  ckpt = train.Checkpointer(workdir)
  step = ckpt.latest_step()
  state, data_position = ckpt.restore(step)
  ckpt.close()
  return step, state, data_position


def _losses(workdir, key='loss'):
  return {r['step']: r[key] for r in train.read_metrics(workdir) if key in r}


def _assert_trees_equal(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=str(path), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_masked_loss_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(3, 6)).astype(np.int32)
  mask = (rng.random((3, 6)) < 0.5).astype(np.int32)
  batch = {'tokens': tokens, 'loss_mask': mask}
  loss, count = _step._batch_loss(lambda p, t: jnp.asarray(logits), None, batch, pad_id=6)  # pylint: disable=protected-access
  total, n = 0.0, 0
  for b in range(3):
    for t in range(5):
      if mask[b, t + 1]:
        z = logits[b, t].astype(np.float64)
        total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, t + 1]]
        n += 1
  assert float(count) == n
  np.testing.assert_allclose(float(loss), total / n, rtol=1e-5)


def test_dict_batch_with_the_pad_mask_equals_the_lm_loss():
  """A loss_mask of every non-pad token gives train_lm's loss and gradient bit for bit."""
  model = models.Decoder(
    models.model_config('tiny', d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=32)
  )
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  tokens = (np.arange(4 * 17, dtype=np.int32).reshape(4, 17) * 37) % 256
  tokens[:, -3:] = 256

  def logits_fn(p, t):
    return model.apply({'params': p}, t)[0]

  batch = {'tokens': tokens, 'loss_mask': (tokens != 256).astype(np.int32)}
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: _step._batch_loss(logits_fn, p, b, 256)[0]))  # pylint: disable=protected-access
  loss_a, grads_a = grad_fn(params, tokens)
  loss_b, grads_b = grad_fn(params, batch)
  assert float(loss_a) == float(loss_b)
  _assert_trees_equal(grads_a, grads_b)


def test_run_lowers_the_completion_loss_and_logs_accuracy(straight_run):
  workdir, result = straight_run
  assert result.step == 8 and not result.halted
  eval_losses = _losses(workdir, 'eval_loss')
  assert sorted(eval_losses) == [4, 8]
  assert eval_losses[8] < eval_losses[4]
  losses = _losses(workdir)
  assert losses[8] < losses[2]
  last = train.read_metrics(workdir)[-1]
  for task in ('arithmetic', 'reversal'):
    assert 0.0 <= last[f'accuracy/{task}'] <= 1.0
    assert result.accuracy[task] == last[f'accuracy/{task}']
  assert last['accuracy/mean'] == pytest.approx(np.mean(list(result.accuracy.values())))
  sampled = [last[f'sampled_accuracy/{task}'] for task in ('arithmetic', 'reversal')]
  assert all(0.0 <= a <= 1.0 for a in sampled)
  assert last['sampled_accuracy/mean'] == pytest.approx(np.mean(sampled))
  assert last['sampled_accuracy_se/arithmetic'] >= 0.0


def test_halt_and_resume_equals_uninterrupted(sft_config, straight_run, tmp_path):
  straight, _ = straight_run
  resumed = str(tmp_path / 'resumed')
  halted = train.train_sft(sft_config(halt_after_steps=5, **{'eval.num_prompts': 0}), resumed)
  assert halted.halted and halted.step == 5
  assert train.Checkpointer(resumed).latest_step() == 5
  train.train_sft(sft_config(**{'eval.num_prompts': 0}), resumed)
  step_a, state_a, data_a = _final_state(straight)
  step_b, state_b, data_b = _final_state(resumed)
  assert step_a == step_b == 8 and data_a == data_b
  _assert_trees_equal(state_a, state_b)
  losses_a, losses_b = _losses(straight), _losses(resumed)
  assert [losses_a[s] for s in (2, 4, 8)] == [losses_b[s] for s in (2, 4, 8)]


def test_eight_devices_match_one_device(sft_config, straight_run, tmp_path):
  one, _ = straight_run
  eight = str(tmp_path / 'eight')
  result = train.train_sft(
    sft_config(**{'mesh.num_devices': None, 'mesh.data': 2, 'mesh.fsdp': 4}), eight
  )
  np.testing.assert_allclose(list(_losses(one).values()), list(_losses(eight).values()), rtol=1e-5)
  np.testing.assert_allclose(
    list(_losses(one, 'eval_loss').values()), list(_losses(eight, 'eval_loss').values()), rtol=1e-5
  )
  _, state_one, _ = _final_state(one)
  _, state_eight, _ = _final_state(eight)
  _assert_trees_equal(state_one['params'], state_eight['params'], rtol=1e-4, atol=1e-6)
  # Greedy sampling with FSDP-sharded params gives the single device's accuracies.
  assert result.accuracy == straight_run[1].accuracy


def _find_nu(tree):
  """The `nu` of the first Adam state in a restored (nested dicts and lists) opt_state."""
  if isinstance(tree, dict) and 'nu' in tree and 'mu' in tree:
    return tree['nu']
  children = (
    tree.values() if isinstance(tree, dict) else (tree if isinstance(tree, (list, tuple)) else ())
  )
  for child in children:
    found = _find_nu(child)
    if found is not None:
      return found
  return None


def test_checkpoint_holds_adams_nu_for_every_param(straight_run):
  workdir, _ = straight_run
  _, state, _ = _final_state(workdir)
  nu = _find_nu(state['opt_state'])
  assert nu is not None, 'no Adam state with nu in the checkpoint'
  assert jax.tree.structure(nu) == jax.tree.structure(state['params'])
  for (path, v), p in zip(
    jax.tree_util.tree_leaves_with_path(nu), jax.tree.leaves(state['params'])
  ):
    assert v.shape == p.shape and v.dtype == np.float32, path
    assert np.all(np.asarray(v) >= 0) and np.any(np.asarray(v) > 0), path


def test_init_from_restores_params_only(sft_config, straight_run, tmp_path):
  source, _ = straight_run
  _, source_state, _ = _final_state(source)
  # Another optimizer: only the params are read (the restore below also onto another mesh).
  config = sft_config(
    init_from=source,
    total_steps=1,
    **{'optimizer.name': 'dmuon', 'optimizer.learning_rate': 0.02, 'eval.num_prompts': 0},
  )
  model = models.Decoder(train.model_config_from(config.model))
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  )
  mesh = train.make_mesh(data=2, fsdp=4)
  params, step = train.restore_params(
    source, train.abstract_like(shapes, train.fsdp_shardings(shapes, mesh)), model.cfg
  )
  assert step == 8
  _assert_trees_equal(source_state['params'], params)
  assert jax.tree.leaves(params)[0].sharding.mesh.shape == mesh.shape

  workdir = str(tmp_path / 'from')
  train.train_sft(config, workdir)
  first = train.read_metrics(workdir)[0]
  scratch = _losses(source)
  assert first['loss'] < scratch[2]  # starts where the source ended, not from scratch

  with pytest.raises(ValueError, match='config.model differs .*d_model: saved 32, config 64'):
    train.train_sft(sft_config(init_from=source, **{'model.d_model': 64}), str(tmp_path / 'bad'))
  with pytest.raises(ValueError, match='no checkpoints/ directory'):
    train.train_sft(sft_config(init_from=str(tmp_path / 'nowhere')), str(tmp_path / 'bad2'))


@pytest.mark.parametrize(
  'overrides, match',
  [
    ({'data.tasks': {'algebra': 1.0}}, r"unknown task\(s\) \['algebra'\]"),
    ({'total_steps': 0}, 'total_steps must be >= 1'),
    ({'data.seq_len': 256}, 'exceeds the model max_len'),
  ],
)
def test_bad_config_values_raise(sft_config, tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    train.train_sft(sft_config(**overrides), str(tmp_path / 'bad'))


def test_resume_with_other_tasks_is_refused(sft_config, straight_run):
  workdir, _ = straight_run
  with pytest.raises(ValueError, match='config.data differs'):
    train.train_sft(sft_config(**{'data.tasks': {'arithmetic': 1.0}}), workdir)
  assert train.Checkpointer(workdir).latest_step() == 8


_VARIANTS = ('arithmetic', 'arithmetic_untied', 'multitask', 'test') + tuple(
  f'expert_{t}' for t in data.TASK_NAMES
)


@pytest.mark.parametrize('arg', _VARIANTS)
def test_config_variants_fit_their_tasks(arg):
  config = train.load_config(os.path.join(REPO, 'configs', 'sft.py'), arg)
  weights = _sft.task_weights(config.data.tasks)
  eval_tasks = _sft.task_weights(config.eval.tasks or config.data.tasks)
  assert config.optimizer.name == 'adamw'
  # The RL policy's head is separate from its embedding, like its pretrained LM's.
  assert (config.model.tie_embeddings is False) == (arg == 'arithmetic_untied')
  if arg == 'arithmetic_untied':
    rl_config = train.load_config(os.path.join(REPO, 'configs', 'rl.py'), 'grpo_aggressive')
    lm_config = train.load_config(os.path.join(REPO, 'configs', 'lm.py'), 'tiny_untied')
    assert config.model.to_dict() == rl_config.model.to_dict() == lm_config.model.to_dict()
    assert config.eval.num_prompts * config.eval.samples_per_prompt >= 1024
  if arg.startswith('expert_'):
    assert weights == {arg[len('expert_') :]: 1.0} and set(eval_tasks) == set(data.TASK_NAMES)
  if arg == 'multitask':
    assert set(weights) == set(data.TASK_NAMES)
  tok = data.ByteTokenizer()
  # Every example fits a training row, every test prompt and completion the sampler.
  for task in set(weights) | set(eval_tasks):
    for split in ('train', 'test'):
      for e in _task_generators.generate_split(task, split, 2000 if split == 'train' else None):
        prompt = len(tok.encode(e['prompt'], add_bos=True))
        completion = len(tok.encode(e['completion'], add_eos=True))
        if task in weights:
          assert prompt + completion <= config.data.seq_len + 1, (arg, e)
        if task in eval_tasks and split == 'test':
          assert prompt <= config.eval.max_prompt_len, (arg, e)
          # The test variant cuts sampling short on purpose (seconds, not accuracy).
          assert completion <= config.eval.max_new_tokens or arg == 'test', (arg, e)
  assert config.data.seq_len <= (config.model.max_len or 512)


def test_unknown_config_variant_raises():
  with pytest.raises(ValueError, match='unknown configs/sft.py variant'):
    train.load_config(os.path.join(REPO, 'configs', 'sft.py'), 'expert_algebra')


def _write_jsonl(directory, questions):
  """GSM8K-style train.jsonl and test.jsonl of 'a+b' questions."""
  for split, pairs in questions.items():
    with open(os.path.join(directory, f'{split}.jsonl'), 'w') as f:
      for a, b in pairs:
        answer = f'{a}+{b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}'
        f.write(json.dumps({'question': f'{a}+{b}?', 'answer': answer}) + '\n')


def test_sft_on_a_jsonl_task(sft_config, tmp_path):
  _write_jsonl(tmp_path, {'train': [(1, 2), (30, 4), (5, 60)], 'test': [(7, 8), (9, 10)]})
  name = f'jsonl:{tmp_path}'
  config = sft_config(total_steps=2, eval_every=2, **{'eval.num_prompts': 2})
  config.data.tasks = ml_collections.ConfigDict({name: 1.0})
  result = train.train_sft(config, str(tmp_path / 'run'))
  assert result.step == 2 and np.isfinite(result.train_loss) and np.isfinite(result.eval_loss)
  assert set(result.accuracy) == {name} and 0 <= result.accuracy[name] <= 1


def test_hf_gsm8k_variant_names_its_data_and_model():
  config = train.load_config(os.path.join(REPO, 'configs', 'sft.py'), 'hf_gsm8k')
  assert config.init_from is None and config.model.name is None
  assert (config.model.dtype, config.model.param_dtype) == ('bfloat16', 'float32')
  assert config.data.seq_len <= config.model.max_len
  assert config.eval.max_prompt_len + config.eval.max_new_tokens <= config.model.max_len
  with pytest.raises(ValueError, match='data.tasks is unset: .*--config.data.tasks=jsonl:/'):
    _sft.task_weights(config.data.tasks)
  config.data.tasks = 'jsonl:/data/gsm8k'  # what --config.data.tasks=jsonl:/data/gsm8k sets
  assert _sft.task_weights(config.data.tasks) == {'jsonl:/data/gsm8k': 1.0}
