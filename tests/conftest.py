"""Test-wide set-up: every test sees a fake 8-device CPU mesh.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import pytest


@pytest.fixture(scope='session')
def mesh8():
  """A ('data', 'fsdp') = (2, 4) mesh over the 8 fake CPU devices."""
  devices = jax.devices()
  if len(devices) < 8:
    pytest.fail(
      f'expected 8 fake CPU devices, got {len(devices)}: XLA_FLAGS={os.environ["XLA_FLAGS"]}'
    )
  return jax.make_mesh((2, 4), ('data', 'fsdp'), devices=devices[:8])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str):
  """get_config(arg) of configs/<name>.py."""
  from curvopt import train  # pylint: disable=g-import-not-at-top

  return train.load_config(os.path.join(REPO, 'configs', f'{name}.py'), arg)


@pytest.fixture(scope='session')
def mini_data_dir(tmp_path_factory):
  """A tfds data dir with the small code corpus prepared once for the whole session."""
  from curvopt import data  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.text_source('code_corpus/mini', 'train', data_dir=data_dir)
  return data_dir


@pytest.fixture
def lm_test_config(mini_data_dir):
  """configs/lm.py:tiny shrunk to seconds: a 2-layer d=32 decoder on the mini corpus."""

  def make(**overrides):
    config = load_config('lm', 'tiny')
    config.model.update(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64)
    config.data.update(
      name='code_corpus/mini', data_dir=mini_data_dir, batch_size=8, seq_len=32, eval_batches=1
    )
    config.update(total_steps=8, log_every=2, eval_every=4, tensorboard=False)
    config.schedule.warmup_steps = 2
    config.checkpoint.update(every=4, async_save=True)
    config.mesh.num_devices = 1
    config.update_from_flattened_dict(overrides)
    return config

  return make
