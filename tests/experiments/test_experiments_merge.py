"""experiments/merge.py end to end on small generated inputs (HF safetensors and orbax)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file
import yaml

from curvopt import data
from curvopt import merge
from curvopt import models
from curvopt import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'hf')
SHAPES = {
  'model.embed_tokens.weight': (16, 8),
  'model.layers.0.mlp.up_proj.weight': (16, 8),
  'model.norm.weight': (8,),
}
DENSITY = 0.3  # configs/merge.py:test's FFG density


def _run(*args):
  return subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, 'experiments', 'merge.py'),
      '--config=' + os.path.join(REPO, 'configs', 'merge.py') + ':test',
      *args,
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    check=False,
  )


def _expected(base, experts, moments):
  masks = [merge.ffg_mask(base, e, v, density=DENSITY) for e, v in zip(experts, moments)]
  return merge.ota(base, experts, moments, masks=masks)


def _hf_inputs(root):
  rng = np.random.default_rng(0)
  base = {n: rng.normal(size=s).astype(ml_dtypes.bfloat16) for n, s in SHAPES.items()}
  os.makedirs(root / 'base')
  save_file(base, str(root / 'base' / 'model.safetensors'), metadata={'format': 'pt'})
  experts, moments = [], []
  for t in range(2):
    weights = {
      n: (v.astype(np.float32) + rng.normal(size=v.shape)).astype(v.dtype) for n, v in base.items()
    }
    nu = {n: (rng.uniform(size=v.shape) ** 4).astype(np.float32) for n, v in base.items()}
    os.makedirs(root / f'e{t}' / 'export')
    save_file(weights, str(root / f'e{t}' / 'model.safetensors'), metadata={'format': 'pt'})
    save_file(nu, str(root / f'e{t}' / 'export' / 'exp_avg_sq.safetensors'))
    experts.append(weights)
    moments.append(nu)
  return base, experts, moments


def test_merge_binary_on_hf_safetensors_refuses_and_overwrites(tmp_path):
  base, experts, moments = _hf_inputs(tmp_path)
  out = tmp_path / 'out'
  args = [
    f'--output={out}',
    f'--config.base={tmp_path / "base"}',
    f'--config.experts={tmp_path / "e0"},{tmp_path / "e1"}',
    '--config.max_shard_bytes=300',
  ]
  done = _run(*args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'wrote 3 tensors (3 merged)' in done.stdout
  assert sorted(os.listdir(out)) == [
    'merge_spec.json',
    'model-00001-of-00002.safetensors',
    'model-00002-of-00002.safetensors',
    'model.safetensors.index.json',
  ]
  assert json.loads((out / 'merge_spec.json').read_text())['method'] == 'ota'
  got = merge.SafetensorsReader(str(out)).read(list(SHAPES))
  jax_tree = lambda d: {n: jnp.asarray(v) for n, v in d.items()}  # noqa: E731
  want = _expected(jax_tree(base), [jax_tree(e) for e in experts], moments)
  for name in SHAPES:
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[name], np.asarray(want[name]))

  (out / 'marker').write_text('old')
  refused = _run(*args)
  assert refused.returncode != 0
  assert 'exists' in refused.stderr and 'overwrite' in refused.stderr
  assert (out / 'marker').exists()

  replaced = _run(*args, '--overwrite', '--config.output_format=orbax')
  assert replaced.returncode == 0, replaced.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['merge_spec.json', 'params']
  again = merge.orbax_params_reader(str(out)).read(list(SHAPES))
  for name in SHAPES:
    np.testing.assert_array_equal(again[name], got[name])
  assert not [f for f in os.listdir(tmp_path) if 'partial' in f]


def _train_checkpoint(workdir, params, lr):
  tx = optax.adamw(lr)
  opt_state = tx.init(params)
  rng = np.random.default_rng(int(lr * 100))
  for _ in range(2):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  state = train.TrainState(
    step=jnp.int32(2), params=params, opt_state=opt_state, rng=jnp.zeros((2,), jnp.uint32)
  )
  checkpointer = train.Checkpointer(str(workdir), async_save=False)
  checkpointer.save(2, state, {'position': 0}, {'name': 'test'})
  checkpointer.close()
  return params, opt_state[0].nu


def test_merge_binary_on_orbax_train_checkpoints(tmp_path):
  rng = np.random.default_rng(1)
  base = {
    'embed': jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
    'layers_0': {'w': jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)},
  }
  merge.save_orbax(str(tmp_path / 'base'), base)
  trained = [_train_checkpoint(tmp_path / f'e{t}', base, 0.1 * (t + 1)) for t in range(2)]
  out = tmp_path / 'out'
  done = _run(
    f'--output={out}',
    f'--config.base={tmp_path / "base"}',
    f'--config.experts={tmp_path / "e0"},{tmp_path / "e1"}',
  )
  assert done.returncode == 0, done.stderr[-3000:]
  got = merge.SafetensorsReader(str(out)).read_tree()
  want = _expected(base, [p for p, _ in trained], [nu for _, nu in trained])
  np.testing.assert_array_equal(got['embed'], np.asarray(want['embed']))
  np.testing.assert_array_equal(got['layers_0']['w'], np.asarray(want['layers_0']['w']))


def test_config_variants_build():
  sys.path.insert(0, REPO)
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top

  for variant in (
    'linear',
    'task_arithmetic',
    'ties',
    'dare',
    'fisher',
    'ota',
    'ota_ffg',
    'ffg_graft',
    'test',
  ):
    config = load_config('merge', variant)
    assert config.method in merge.METHODS
  with pytest.raises(ValueError, match='unknown configs/merge.py variant'):
    load_config('merge', 'slerp')


def _run_config(config, *args):
  return subprocess.run(
    [sys.executable, os.path.join(REPO, 'experiments', 'merge.py'), f'--config={config}', *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    check=False,
  )


def test_every_method_option_is_settable_and_checked(tmp_path):
  _hf_inputs(tmp_path)
  inputs = [
    f'--config.base={tmp_path / "base"}',
    f'--config.experts={tmp_path / "e0"},{tmp_path / "e1"}',
  ]
  config = os.path.join(REPO, 'configs', 'merge.py') + ':ota'
  done = _run_config(
    config,
    f'--output={tmp_path / "out"}',
    *inputs,
    '--config.options.fallback_to_base=False',  # not in the ota preset's options
    '--config.options.scales=1,2',
    '--config.options.bias_correction=0.999:10,0.99:20',
  )
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads((tmp_path / 'out' / 'merge_spec.json').read_text())
  assert record['options']['fallback_to_base'] is False
  assert record['options']['bias_correction'] == [[0.999, 10], [0.99, 20]]
  assert [e['scale'] for e in record['experts']] == [1.0, 2.0]
  bad = _run_config(config, f'--output={tmp_path / "bad"}', *inputs, '--config.options.densty=1')
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == (
    "merge failed: unknown option 'densty' for method 'ota'; valid: ['bias_correction', "
    "'combine', 'eps', 'fallback_to_base', 'normalise', 'power', 'scales']"
  )
  assert 'Traceback' not in bad.stderr


def test_mergekit_yaml_config(tmp_path):
  base, experts, _ = _hf_inputs(tmp_path)
  config = {
    'merge_method': 'ties',
    'base_model': str(tmp_path / 'base'),
    'models': [
      {'model': str(tmp_path / f'e{t}'), 'parameters': {'weight': 1.0, 'density': 0.5}}
      for t in range(2)
    ],
    'dtype': 'float32',
  }
  (tmp_path / 'merge.yml').write_text(yaml.safe_dump(config))
  done = _run_config(tmp_path / 'merge.yml', f'--output={tmp_path / "out"}')
  assert done.returncode == 0, done.stderr[-3000:]
  got = merge.SafetensorsReader(str(tmp_path / 'out')).read(list(SHAPES))
  f32 = lambda d: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()}  # noqa: E731
  want = merge.ties(f32(base), [f32(e) for e in experts], density=0.5)
  for name in SHAPES:
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], np.asarray(want[name]))


def test_input_and_output_errors_are_one_line(tmp_path):
  _hf_inputs(tmp_path)
  data = (tmp_path / 'e1' / 'model.safetensors').read_bytes()
  (tmp_path / 'e1' / 'model.safetensors').write_bytes(data[:-7])
  (tmp_path / 'file').write_text('x')
  inputs = [
    f'--config.base={tmp_path / "base"}',
    f'--config.experts={tmp_path / "e0"},{tmp_path / "e1"}',
  ]
  for output, text in (
    (tmp_path / 'out', 'is truncated'),
    (tmp_path / 'file' / 'out', 'is a file'),
  ):
    done = _run(f'--output={output}', *inputs)
    assert done.returncode != 0
    assert 'Traceback' not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith('merge failed: ') and text in last, last


def test_ota_of_trainer_checkpoints(tmp_path):
  """Experts as Hugging Face Trainer checkpoints: weights in model.safetensors, Adam moments in
  optimizer.pt (by parameter index; the names file gives the index order)."""
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  base = {n: np.asarray(torch.randn(s), np.float32) for n, s in SHAPES.items()}
  os.makedirs(tmp_path / 'base')
  save_file(base, str(tmp_path / 'base' / 'model.safetensors'))
  order = list(SHAPES)
  experts, moments = [], []
  for t in range(2):
    params = [torch.nn.Parameter(torch.tensor(base[n])) for n in order]
    optimizer = torch.optim.AdamW([{'params': params[:2]}, {'params': params[2:]}], lr=0.1)
    for _ in range(2):
      optimizer.zero_grad()
      sum(((p - t) ** 2 * (i + 1)).sum() for i, p in enumerate(params)).backward()
      optimizer.step()
    checkpoint = tmp_path / f'e{t}' / 'checkpoint-2'
    os.makedirs(checkpoint)
    expert = {n: p.detach().numpy().copy() for n, p in zip(order, params)}
    save_file(expert, str(checkpoint / 'model.safetensors'))
    torch.save(optimizer.state_dict(), checkpoint / 'optimizer.pt')
    experts.append(expert)
    moments.append({n: optimizer.state[p]['exp_avg_sq'].numpy() for n, p in zip(order, params)})
  (tmp_path / 'names.txt').write_text('\n'.join(order))
  done = _run_config(
    os.path.join(REPO, 'configs', 'merge.py') + ':ota',
    f'--output={tmp_path / "out"}',
    f'--config.base={tmp_path / "base"}',
    f'--config.experts={tmp_path / "e0" / "checkpoint-2"},{tmp_path / "e1" / "checkpoint-2"}',
    '--config.moments_format=trainer',
    f'--config.moments_names={tmp_path / "names.txt"}',
  )
  assert done.returncode == 0, done.stderr[-3000:]
  tree = lambda d: {n: jnp.asarray(v) for n, v in d.items()}  # noqa: E731
  want = merge.ota(tree(base), [tree(e) for e in experts], moments)
  got = merge.SafetensorsReader(str(tmp_path / 'out')).read(order)
  for name in order:
    np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)


def _bf16_hf_checkpoint(path, model_cfg, params):
  models.save_hf(str(path), model_cfg, params, dtype='bfloat16')
  for f in os.listdir(os.path.join(FIXTURES, 'tokenizer')):
    shutil.copy(os.path.join(FIXTURES, 'tokenizer', f), path)
  _, loaded = models.load_hf(str(path))  # fp32 holding the stored bf16 values exactly
  return loaded


def test_merge_binary_round_trips_a_hugging_face_model(tmp_path):
  """A task-arithmetic merge of save_hf experts loads back with load_hf as numpy computes it."""
  model_cfg, fixture = models.load_hf(os.path.join(FIXTURES, 'qwen2'))
  rng = np.random.default_rng(3)
  base = _bf16_hf_checkpoint(tmp_path / 'base', model_cfg, fixture)
  experts = [
    _bf16_hf_checkpoint(
      tmp_path / f'e{t}',
      model_cfg,
      jax.tree.map(lambda p: p + 0.05 * rng.normal(size=p.shape).astype(np.float32), fixture),
    )
    for t in range(2)
  ]
  out = tmp_path / 'out'
  done = _run_config(
    os.path.join(REPO, 'configs', 'merge.py') + ':task_arithmetic',
    f'--output={out}',
    f'--config.base={tmp_path / "base"}',
    f'--config.experts={tmp_path / "e0"},{tmp_path / "e1"}',
    '--config.weights=1,0.5',
    '--config.options.scale=0.75',
  )
  assert done.returncode == 0, done.stderr[-3000:]
  for name in ('config.json', 'tokenizer.json'):
    assert (out / name).exists(), sorted(os.listdir(out))

  got_cfg, got = models.load_hf(str(out))
  assert got_cfg == model_cfg
  base_tokenizer = data.HFTokenizer(str(tmp_path / 'base'))
  assert data.HFTokenizer(str(out)).vocab_size == base_tokenizer.vocab_size

  def reference(b, e0, e1):
    # The merge kernel's fp32 operations in its order, acc = w0 (e0 - b) + w1 (e1 - b), then
    # b + scale acc, rounded to the stored bf16: bit for bit what the binary writes.
    b, e0, e1 = (np.asarray(x, np.float32) for x in (b, e0, e1))
    acc = np.float32(0) + np.float32(1) * (e0 - b)
    acc = acc + np.float32(0.5) * (e1 - b)
    return (b + np.float32(0.75) * acc).astype(ml_dtypes.bfloat16).astype(np.float32)

  want = jax.tree.map(reference, base, *experts)
  for (path, g), w, b in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), jax.tree.leaves(base)
  ):
    g = np.asarray(g)
    assert not np.array_equal(g, np.asarray(b)), path  # merged, not copied
    np.testing.assert_array_equal(g, w, err_msg=str(path))
