"""The trainers from a Hugging Face checkpoint (`init_from='hf:/path'`): SFT, RL and LM start
from its params, read into their FSDP shards, with its tokenizer."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from curvopt import data
from curvopt import models
from curvopt import train
from curvopt.train import _setup

pytest.importorskip('tokenizers')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'hf')
# config.model of the test configs sets our sizes; a Hugging Face checkpoint brings its own.
_SIZES = ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'vocab_size', 'tie_embeddings')


def _hf_dir(tmp_path_factory, family):
  """A fixture checkpoint with the fixture tokenizer beside it, as a model directory holds."""
  path = tmp_path_factory.mktemp(f'hf_{family}')
  shutil.copytree(os.path.join(FIXTURES, family), path, dirs_exist_ok=True)
  for f in os.listdir(os.path.join(FIXTURES, 'tokenizer')):
    shutil.copy(os.path.join(FIXTURES, 'tokenizer', f), path)
  return str(path)


def _config(name, hf_dir, **overrides):
  config = train.load_config(os.path.join(REPO, 'configs', f'{name}.py'), 'test')
  config.init_from = f'hf:{hf_dir}'
  for field in _SIZES:
    config.model[field] = None
  config.update_from_flattened_dict(overrides)
  return config


def _final_params(workdir):
  ckpt = train.Checkpointer(workdir)
  state, _ = ckpt.restore(ckpt.latest_step())
  ckpt.close()
  return state['params']


def _length_reward(prompts, completions, answers):
  """A reward a random policy already varies on (exact match would give no gradient)."""
  del prompts, answers
  return np.asarray([len(text) / 64 for text in completions], np.float32)


def _assert_started_from(params, loaded, max_step):
  """Trained a little from `loaded`: Adam moves each entry by about lr a step, no more."""
  moved = [
    np.abs(np.asarray(a) - np.asarray(b)).max()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded))
  ]
  assert 0 < max(moved) <= max_step, moved


@pytest.fixture(scope='module')
def sft_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds_hf'))
  for task in ('arithmetic', 'reversal'):
    data.task_source(task, 'test', data_dir=data_dir)
  return data_dir


def test_sft_steps_from_a_checkpoint_on_an_fsdp_mesh(tmp_path_factory, sft_data_dir):
  hf_dir = _hf_dir(tmp_path_factory, 'qwen2')
  config = _config(
    'sft',
    hf_dir,
    total_steps=2,
    eval_every=2,
    **{
      'data.data_dir': sft_data_dir,
      'data.seq_len': 96,
      'model.max_len': 128,  # beyond the checkpoint's 64 positions: RoPE extrapolates
      'eval.num_prompts': 0,  # the RL test samples with the Hugging Face tokenizer
      'mesh.num_devices': None,
      'mesh.fsdp': 4,
    },
  )
  workdir = str(tmp_path_factory.mktemp('sft_hf'))
  result = train.train_sft(config, workdir)
  assert result.step == 2 and np.isfinite(result.train_loss) and np.isfinite(result.eval_loss)
  _, loaded = models.load_hf(hf_dir)
  _assert_started_from(_final_params(workdir), loaded, 2.5 * config.optimizer.learning_rate)


# Slow (~45 s): the SFT test above covers init_from='hf:' through the trainers' shared setup.
@pytest.mark.slow
def test_rl_steps_from_an_untied_checkpoint(tmp_path_factory, sft_data_dir):
  hf_dir = _hf_dir(tmp_path_factory, 'mistral')
  config = _config(
    'rl',
    hf_dir,
    total_steps=2,
    **{'task.data_dir': sft_data_dir, 'model.max_len': 128, 'task.eval_prompts': 2},
  )
  workdir = str(tmp_path_factory.mktemp('rl_hf'))
  result = train.train_rl(config, workdir, reward_fn=_length_reward)
  assert result.step == 2 and result.completions_seen == 2 * 4 * config.rollout.prompts_per_step
  assert np.isfinite(result.reward) and 0 <= result.eval_accuracy <= 1
  rewards = [r['reward'] for r in train.read_metrics(workdir) if 'reward' in r]
  assert len(rewards) == 2 and max(rewards) > 0  # completions decoded to text
  _, loaded = models.load_hf(hf_dir)
  # grad_clip_norm bounds the first steps' Adam updates by lr as well.
  _assert_started_from(_final_params(workdir), loaded, 2.5 * config.optimizer.learning_rate)


def _write_gsm8k_jsonl(directory):
  """A GSM8K-style train.jsonl / test.jsonl of short questions (the fixture tokenizer spends a
  token a character)."""
  splits = {'train': [(1, 2), (3, 4), (5, 6), (7, 8)], 'test': [(2, 2), (6, 3)]}
  for split, pairs in splits.items():
    with open(os.path.join(directory, f'{split}.jsonl'), 'w') as f:
      for a, b in pairs:
        answer = f'{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}'
        f.write(json.dumps({'question': f'{a}+{b}?', 'answer': answer}) + '\n')
  return str(directory)


# Slow (~50 s): tests/data covers task_source('jsonl:...'), which is all the RL trainer calls,
# and tests/train/test_train_sft.py trains on a JSONL task by default.
@pytest.mark.slow
def test_rl_steps_from_a_checkpoint_on_gsm8k_style_jsonl(tmp_path_factory):
  hf_dir = _hf_dir(tmp_path_factory, 'qwen2')
  jsonl_dir = _write_gsm8k_jsonl(tmp_path_factory.mktemp('gsm8k'))
  config = _config(
    'rl',
    hf_dir,
    total_steps=2,
    **{
      'task.name': f'jsonl:{jsonl_dir}',
      'model.max_len': 128,
      'task.eval_prompts': 2,
      'eval.sampled_prompts': 2,
      'capo.mode': 'off',
    },
  )
  workdir = str(tmp_path_factory.mktemp('rl_gsm8k'))
  # The exact-match reward of the configs: a random policy scores 0, so the advantages are
  # 0 and the steps leave the params; the run reads, samples, rewards and checkpoints.
  result = train.train_rl(config, workdir)
  assert result.step == 2 and result.completions_seen == 2 * 4 * config.rollout.prompts_per_step
  assert 0 <= result.reward <= 1 and 0 <= result.eval_accuracy <= 1
  ckpt = train.Checkpointer(workdir)
  assert ckpt.latest_step() == 2
  _, stream = ckpt.restore(2)
  ckpt.close()
  assert stream == {'position': 2 * config.rollout.prompts_per_step}  # two epochs of 4 prompts
  rows = [r for r in train.read_metrics(workdir) if 'reward' in r]
  assert [r['step'] for r in rows] == [1, 2]


def test_lm_setup_takes_the_checkpoint_and_its_tokenizer(tmp_path_factory):
  hf_dir = _hf_dir(tmp_path_factory, 'llama')
  config = train.load_config(os.path.join(REPO, 'configs', 'lm.py'), 'tiny')
  config.init_from = f'hf:{hf_dir}'
  config.model.max_len = 32
  run = _setup.setup_run(config, str(tmp_path_factory.mktemp('lm_hf')))
  expected, _ = models.load_hf(hf_dir, max_len=32)
  assert run.model_cfg == expected and run.hf_dir == hf_dir
  assert isinstance(run.tokenizer, data.HFTokenizer) and run.tokenizer.eos_id == 2


# (config changes, error fragment)
BAD = [
  ({'model.d_model': 64}, r'config.model differs .*d_model: config 64, checkpoint 32'),
  ({'init_from': 'hf:'}, 'names no directory'),
  ({'init_from': 'hf:/nowhere'}, 'not a directory'),
]


@pytest.mark.parametrize('changes,fragment', BAD)
def test_bad_hf_setups_raise(changes, fragment, tmp_path_factory):
  hf_dir = _hf_dir(tmp_path_factory, 'llama')
  config = _config('sft', hf_dir)
  config.update_from_flattened_dict(changes)
  with pytest.raises(ValueError, match=fragment):
    _setup.setup_run(config, str(tmp_path_factory.mktemp('bad')))


def test_train_lm_takes_only_hf_init(lm_test_config, tmp_path):
  with pytest.raises(ValueError, match="init_from='/some/run' must be 'hf:/path/to/model'"):
    train.train_lm(lm_test_config(init_from='/some/run'), str(tmp_path))
