"""End-to-end tests of the LM trainer: golden first step, resume exactness (halt, SIGKILL),
the NaN guard, config errors, and 8-device / two-process equivalence with one device."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt import models
from curvopt import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_LM = os.path.join(REPO, 'experiments', 'train_lm.py')


def _final_state(workdir, step=None):
  ckpt = train.Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  state, data_position = ckpt.restore(step)
  ckpt.close()
  return step, state, data_position


def _assert_trees_equal(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=str(path), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _losses(workdir):
  return {r['step']: r['loss'] for r in train.read_metrics(workdir)}


def _write_config_file(config, path):
  """A config file whose get_config() returns `config`, for the binary's --config flag."""
  with open(path, 'w') as f:
    f.write(
      'import json\nimport ml_collections\n\n\ndef get_config():\n'
      f'  return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n'
    )
  return path


# The loss of a fixed batch under the tiny decoder's seed-0 init, and after one AdamW step.
# Recomputed by hand only when the model or its init changes on purpose.
GOLDEN_FIRST_LOSSES = (5.96471643447876, 5.311869144439697)


def test_golden_first_train_steps():
  model = models.Decoder(models.model_config('tiny'))
  optimizer = optax.adamw(1e-3, weight_decay=0.1)
  state = jax.jit(train.make_init_state(model, optimizer, seq_len=16))(jax.random.key(0))
  tokens = (jnp.arange(4 * 17, dtype=jnp.int32).reshape(4, 17) * 37) % 256
  step = jax.jit(
    train.make_train_step(
      lambda p, t: model.apply({'params': p}, t)[0],
      optimizer,
      pad_id=256,
      learning_rate=lambda s: 1e-3,
    )
  )
  state, m1 = step(state, tokens)
  _, m2 = step(state, tokens)
  # An untrained model is near-uniform over the vocabulary.
  assert abs(float(m1['loss']) - np.log(model.cfg.vocab_size)) < 0.05
  assert float(m2['loss']) < float(m1['loss'])
  np.testing.assert_allclose([float(m1['loss']), float(m2['loss'])], GOLDEN_FIRST_LOSSES, rtol=1e-5)


# Slow: the SIGKILL restart below resumes the LM trainer exactly, and the SFT and RL trainers'
# halt-and-resume tests cover the shared loop's halt_after_steps.
@pytest.mark.slow
def test_halt_and_resume_equals_uninterrupted(lm_test_config, tmp_path):
  straight = str(tmp_path / 'straight')
  result = train.train_lm(lm_test_config(), straight)
  assert result.step == 8 and not result.halted and np.isfinite(result.eval_loss)

  resumed = str(tmp_path / 'resumed')
  halted = train.train_lm(lm_test_config(halt_after_steps=5), resumed)
  assert halted.halted and halted.step == 5
  assert train.Checkpointer(resumed).latest_step() == 5  # halting always checkpoints
  train.train_lm(lm_test_config(), resumed)

  step_a, state_a, data_a = _final_state(straight)
  step_b, state_b, data_b = _final_state(resumed)
  assert step_a == step_b == 8 and data_a == data_b
  _assert_trees_equal(state_a, state_b)
  # Logged losses are window means; the halt at step 5 splits only the window of step 6.
  losses_a, losses_b = _losses(straight), _losses(resumed)
  assert [losses_a[s] for s in (2, 4, 8)] == [losses_b[s] for s in (2, 4, 8)]


def test_sigkill_after_checkpoint_then_restart_matches(lm_test_config, tmp_path):
  config = lm_test_config(total_steps=100, log_every=50, eval_every=0)
  config.checkpoint.every = 5
  config_file = _write_config_file(config, str(tmp_path / 'config.py'))
  killed = str(tmp_path / 'killed')
  cmd = [sys.executable, TRAIN_LM, f'--config={config_file}', f'--workdir={killed}']
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  ckpt_dir = os.path.join(killed, 'checkpoints')
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
  latest = train.Checkpointer(killed).latest_step()
  assert latest is not None and latest < 100, f'killed too late: latest checkpoint {latest}'

  subprocess.run(cmd, check=True, capture_output=True)
  straight = str(tmp_path / 'straight')
  train.train_lm(config, straight)
  _, state_a, data_a = _final_state(straight)
  step_b, state_b, data_b = _final_state(killed)
  assert step_b == 100 and data_a == data_b
  _assert_trees_equal(state_a, state_b)


def test_non_finite_loss_stops_without_checkpointing_it(lm_test_config, tmp_path):
  config = lm_test_config(
    **{
      'optimizer.learning_rate': 1e30,
      'optimizer.grad_clip_norm': 0.0,
      'schedule.name': 'constant',
      'schedule.warmup_steps': 0,
    }
  )
  config.checkpoint.every = 1
  workdir = str(tmp_path / 'nan')
  with pytest.raises(train.NonFiniteError, match=r'non-finite (loss|grad_norm) .* at step 2'):
    train.train_lm(config, workdir)
  assert train.Checkpointer(workdir).latest_step() == 1


@pytest.mark.parametrize(
  'overrides, match',
  [
    ({'optimizer.name': 'sgdd'}, r"unknown optimizer 'sgdd'"),
    ({'total_steps': 0}, 'total_steps must be >= 1, got 0'),
    ({'mesh.data': 3, 'mesh.num_devices': None}, 'data=3'),
    ({'model.name': 'huge'}, 'huge'),
    ({'schedule.name': 'cyclic'}, "unknown schedule 'cyclic'"),
    ({'data.name': 'no_such_dataset'}, 'no_such_dataset'),
  ],
)
def test_bad_config_values_raise(lm_test_config, tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    train.train_lm(lm_test_config(**overrides), str(tmp_path / 'bad'))


def test_resume_with_a_different_model_is_refused(lm_test_config, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_lm(lm_test_config(halt_after_steps=2), workdir)
  with pytest.raises(ValueError, match='config.model differs'):
    train.train_lm(lm_test_config(**{'model.d_model': 64}), workdir)


# LANTON: its per-leaf state vectors are sharded by the trainer's FSDP rule too (slow; the
# transform's own sharded test, tests/optim/test_optim_sharding.py, covers its state on 8 devices).
@pytest.mark.parametrize(
  'optimizer',
  [
    {},
    pytest.param(
      {'optimizer.name': 'lanton', 'optimizer.learning_rate': 0.02}, marks=pytest.mark.slow
    ),
  ],
)
def test_eight_devices_match_one_device(lm_test_config, tmp_path, optimizer):
  one = str(tmp_path / 'one')
  train.train_lm(lm_test_config(**optimizer), one)
  eight = str(tmp_path / 'eight')
  train.train_lm(
    lm_test_config(**optimizer, **{'mesh.num_devices': None, 'mesh.data': 2, 'mesh.fsdp': 4}), eight
  )
  np.testing.assert_allclose(list(_losses(one).values()), list(_losses(eight).values()), rtol=1e-5)
  _, state_one, _ = _final_state(one)
  _, state_eight, _ = _final_state(eight)
  _assert_trees_equal(state_one['params'], state_eight['params'], rtol=1e-4, atol=1e-6)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(lm_test_config, tmp_path):
  config = lm_test_config(**{'mesh.num_devices': None, 'mesh.data': 2, 'mesh.fsdp': 4})
  config_file = _write_config_file(config, str(tmp_path / 'config.py'))
  two = str(tmp_path / 'two')
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        TRAIN_LM,
        f'--config={config_file}',
        f'--workdir={two}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert 'process 1 of 2' in outputs[1]

  one = str(tmp_path / 'one')
  train.train_lm(config, one)
  np.testing.assert_allclose(list(_losses(one).values()), list(_losses(two).values()), rtol=1e-5)
  _, state_one, data_one = _final_state(one)
  _, state_two, data_two = _final_state(two)
  assert data_one == data_two
  _assert_trees_equal(state_one['params'], state_two['params'], rtol=1e-4, atol=1e-6)


def test_lanton_run_logs_per_layer_learning_rate_scales(lm_test_config, tmp_path):
  workdir = str(tmp_path / 'lanton')
  config = lm_test_config(
    **{
      'optimizer.name': 'lanton',
      'optimizer.learning_rate': 0.02,
      'optimizer.lanton_mapping': 'min_ratio',
      'total_steps': 4,
    }
  )
  result = train.train_lm(config, workdir)
  assert np.isfinite(result.train_loss)
  last = train.read_metrics(workdir)[-1]
  scales = {k: v for k, v in last.items() if k.startswith('lanton/lr_scale/')}
  assert 'lanton/lr_scale/layers_0/attn/q/kernel' in scales
  assert 'lanton/lr_scale/embed/embedding' in scales
  assert all(0.0 < v <= 1.0 + 1e-6 for v in scales.values())
  hidden = [v for k, v in scales.items() if '/layers_' in k]
  assert max(hidden) == pytest.approx(1.0, abs=1e-3)  # min_ratio: the least noisy layer gets 1
  assert last['lanton/clip_low/hidden'] == last['lanton/clip_high/hidden'] == 0.0  # no clip
  # The config's grad_clip_norm is set: the share of the logged window's steps it clipped.
  assert last['grad_clipped'] in (0.0, 0.5, 1.0)  # log_every 2
