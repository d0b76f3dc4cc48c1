"""merge_from_spec end to end on small HF-layout directories: the output directory, the spec
record, mixed dtypes, extra tensors, option names and the errors a user meets."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from curvopt import merge
from curvopt import models

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tensor names of our Decoder's params, so the output loads into it.
CFG = models.model_config(
  'tiny', vocab_size=32, d_model=16, d_ff=32, n_layers=1, n_heads=2, n_kv_heads=2
)
MODEL_FILES = {
  'config.json': '{"model_type": "llama", "hidden_size": 16}',
  'generation_config.json': '{"max_new_tokens": 8}',
  'tokenizer.json': '{"version": "1.0"}',
  'tokenizer_config.json': '{"model_max_length": 64}',
}


def _decoder_params(seed):
  params = models.Decoder(CFG).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))['params']
  return {
    jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def _write_model(path, tensors, *, files=MODEL_FILES, moments=None, tag=''):
  os.makedirs(path / 'export')
  save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  for name, text in files.items():
    (path / name).write_text(text.replace('}', f', "tag": "{tag}"}}') if tag else text)
  if moments is not None:
    save_file(moments, str(path / 'export' / 'exp_avg_sq.safetensors'))


def _models(root, num=2, dtype=np.float32, expert_dtype=None):
  """A base and `num` experts (+ exp_avg_sq) with our Decoder's tensor names."""
  rng = np.random.default_rng(0)
  base = {n: v.astype(dtype) for n, v in _decoder_params(0).items()}
  _write_model(root / 'base', base, tag='base')
  experts, moments = [], []
  for t in range(num):
    expert = {
      n: (v.astype(np.float32) + 0.1 * rng.normal(size=v.shape)).astype(expert_dtype or dtype)
      for n, v in base.items()
    }
    nu = {n: (rng.uniform(size=v.shape) ** 4).astype(np.float32) for n, v in base.items()}
    _write_model(root / f'e{t}', expert, moments=nu, tag=f'e{t}')
    experts.append(expert)
    moments.append(nu)
  return base, experts, moments


def _spec(root, method='ota', num=2, **extra):
  spec = {
    'method': method,
    'base': {'path': str(root / 'base')},
    'experts': [{'path': str(root / f'e{t}')} for t in range(num)],
  }
  spec.update(extra)
  return spec


def _tree(d):
  return {n: jnp.asarray(v) for n, v in d.items()}


def _read(path):
  reader = merge.open_reader(str(path))
  return reader.read(list(reader.names))


def test_output_directory_is_loadable(tmp_path):
  base, experts, moments = _models(tmp_path)
  out = tmp_path / 'out'
  merge.merge_from_spec(_spec(tmp_path, ffg={'density': 0.3}), str(out))
  assert sorted(os.listdir(out)) == sorted(['merge_spec.json', 'model.safetensors', *MODEL_FILES])
  # The base's files, not an expert's.
  assert json.loads((out / 'config.json').read_text())['tag'] == 'base'
  got = _read(out)
  masks = [merge.ffg_mask(_tree(base), _tree(e), m, density=0.3) for e, m in zip(experts, moments)]
  want = merge.ota(_tree(base), [_tree(e) for e in experts], moments, masks=masks)
  for name in base:
    np.testing.assert_array_equal(got[name], np.asarray(want[name]))
  # Our Decoder runs on the merged params as read back.
  params = merge.open_reader(str(out)).read_tree()
  logits = models.Decoder(CFG).apply({'params': params}, jnp.zeros((1, 4), jnp.int32))[0]
  assert logits.shape == (1, 4, 32) and np.isfinite(np.asarray(logits)).all()


def test_without_a_base_the_first_experts_files_are_copied(tmp_path):
  _models(tmp_path)
  out = tmp_path / 'out'
  spec = _spec(tmp_path, method='linear')
  del spec['base']
  merge.merge_from_spec(spec, str(out))
  assert json.loads((out / 'tokenizer_config.json').read_text())['tag'] == 'e0'


def test_output_dtype_and_shards(tmp_path):
  base, _, _ = _models(tmp_path)
  out = tmp_path / 'out'
  spec = _spec(
    tmp_path, method='task_arithmetic', output={'dtype': 'bfloat16', 'max_shard_bytes': 2000}
  )
  merge.merge_from_spec(spec, str(out))
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  assert set(index['weight_map']) == set(base)
  assert len(set(index['weight_map'].values())) > 1
  got = _read(out)
  assert {v.dtype for v in got.values()} == {np.dtype(ml_dtypes.bfloat16)}
  # The default: one 5 GB shard (so one file for a small model).
  assert merge.DEFAULT_SHARD_BYTES == 5_000_000_000
  merge.merge_from_spec(_spec(tmp_path, method='task_arithmetic'), str(tmp_path / 'one'))
  assert 'model.safetensors' in os.listdir(tmp_path / 'one')


def test_base_and_experts_of_different_float_dtypes(tmp_path):
  base, experts, _ = _models(tmp_path, dtype=ml_dtypes.bfloat16, expert_dtype=np.float32)
  out = tmp_path / 'out'
  merge.merge_from_spec(_spec(tmp_path, method='ties', options={'density': 0.5}), str(out))
  got = _read(out)
  f32 = lambda d: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()}  # noqa: E731
  want = merge.ties(f32(base), [f32(e) for e in experts], density=0.5)
  for name in base:
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[name], np.asarray(want[name].astype(jnp.bfloat16)))


def test_expert_tensor_the_base_lacks(tmp_path):
  base, experts, _ = _models(tmp_path)
  extra = dict(experts[1], **{'head/kernel': np.ones((16, 32), np.float32)})
  os.remove(tmp_path / 'e1' / 'model.safetensors')
  save_file(extra, str(tmp_path / 'e1' / 'model.safetensors'))
  spec = _spec(tmp_path, method='linear')
  with pytest.raises(ValueError, match=r"expert 1 .* 1 tensors that the base lacks.*'head/kernel'"):
    merge.merge_from_spec(spec, str(tmp_path / 'out'))
  result = merge.merge_from_spec(dict(spec, extra_tensors='drop'), str(tmp_path / 'out'))
  assert result.dropped == ((), ('head/kernel',))
  record = json.loads((tmp_path / 'out' / 'merge_spec.json').read_text())
  assert record['result']['dropped'] == {'expert 1': ['head/kernel']}
  assert 'head/kernel' not in _read(tmp_path / 'out')


def test_options_are_checked_against_the_method(tmp_path):
  _models(tmp_path)
  with pytest.raises(ValueError, match=r"unknown option 'densty' for method 'ties'; valid: .*"):
    merge.merge_from_spec(
      _spec(tmp_path, method='ties', options={'densty': 0.5}), str(tmp_path / 'o')
    )
  with pytest.raises(ValueError, match=r"method 'ties' needs the option\(s\) \['density'\]"):
    merge.merge_from_spec(_spec(tmp_path, method='ties'), str(tmp_path / 'o'))
  with pytest.raises(ValueError, match="unknown expert field.*'wieght'"):
    spec = _spec(tmp_path, method='linear')
    spec['experts'][0]['wieght'] = 2.0
    merge.merge_from_spec(spec, str(tmp_path / 'o'))
  assert set(merge.method_options('ota')) >= {'fallback_to_base', 'combine', 'scales', 'eps'}


def test_merge_spec_json_reproduces_the_merge(tmp_path):
  _models(tmp_path, num=3)
  spec = _spec(
    tmp_path,
    num=3,
    options={'eps': 1e-8, 'fallback_to_base': False},
    ffg={'density': 0.5},
  )
  for t, d in enumerate([0.2, 0.4, 0.6]):
    spec['experts'][t]['density'] = d
  result = merge.merge_from_spec(spec, str(tmp_path / 'first'))
  record = json.loads((tmp_path / 'first' / 'merge_spec.json').read_text())
  assert [e['density'] for e in record['experts']] == [0.2, 0.4, 0.6]
  assert [e['ffg_cutoff'] for e in record['experts']] == list(result.thresholds)
  assert 'density' not in record['ffg']  # not the preset's beside the ones used
  assert record['options']['fallback_to_base'] is False
  assert record['options']['power'] == 0.5  # defaults are recorded too
  assert [e['moments']['format'] for e in record['experts']] == ['exp_avg_sq'] * 3
  first = _read(tmp_path / 'first')
  merge.merge_from_spec(record, str(tmp_path / 'again'))
  # Another tool has the cutoffs: the same masks from thresholds alone.
  by_cutoff = json.loads(json.dumps(record))
  for expert in by_cutoff['experts']:
    del expert['density']
  by_cutoff['ffg']['threshold'] = [e['ffg_cutoff'] for e in record['experts']]
  merge.merge_from_spec(by_cutoff, str(tmp_path / 'by_cutoff'))
  for other in ('again', 'by_cutoff'):
    got = _read(tmp_path / other)
    for name, value in first.items():
      np.testing.assert_array_equal(got[name], value, err_msg=f'{other} {name}')


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
  out = tmp_path / 'out'
  dead = tmp_path / '.out.partial-999999999'  # beyond any pid
  live = tmp_path / f'.out.partial-{os.getppid()}'
  for partial in (dead, live):
    partial.mkdir()
    (partial / 'model.safetensors').write_bytes(b'x' * 100)
  assert merge.remove_stale_partials(str(out)) == [str(dead)]
  assert not dead.exists() and live.exists()


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 10])


def _pytorch_only(path):
  os.remove(path / 'model.safetensors')
  (path / 'pytorch_model.bin').write_bytes(b'pickle')


def _empty_dir(path):
  for name in os.listdir(path):
    if os.path.isfile(path / name):
      os.remove(path / name)


# case -> (change the inputs under root, output under root, the one-line error)
ERRORS = {
  'truncated_safetensors': (
    lambda root: _truncate(root / 'e1' / 'model.safetensors'),
    'out',
    r'e1/model.safetensors is truncated',
  ),
  'output_parent_is_a_file': (
    lambda root: (root / 'file').write_text('x'),
    'file/out',
    r'file is a file, not a directory',
  ),
  'unwritable_output': (lambda root: None, '/proc/merged', 'cannot'),
  'pytorch_bin_only': (
    lambda root: _pytorch_only(root / 'e0'),
    'out',
    r'pytorch_model.bin.*not read.*save_pretrained.*safe_serialization=True',
  ),
  'no_model_at_all': (
    lambda root: _empty_dir(root / 'e0'),
    'out',
    r"neither safetensors files .* nor an orbax checkpoint .* it holds \['export/'\]",
  ),
}


@pytest.mark.parametrize('case', sorted(ERRORS))
def test_errors_are_one_line(tmp_path, case):
  _models(tmp_path)
  change, output, text = ERRORS[case]
  change(tmp_path)
  with pytest.raises(ValueError, match=text) as raised:
    merge.merge_from_spec(_spec(tmp_path, method='linear'), str(tmp_path / output))
  assert '\n' not in str(raised.value)
  assert not [f for f in os.listdir(tmp_path) if '.partial-' in f]


_STALLED_MERGE = """
import json, sys, time
from curvopt import merge

def stall(name):
  print('writing', flush=True)
  time.sleep(600)

merge.merge_from_spec(json.loads(sys.argv[1]), sys.argv[2], progress=stall)
"""


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGKILL])
def test_killed_merge_leaves_no_partial_output(tmp_path, signum):
  """SIGTERM is handled like Ctrl-C (the partial output goes at once); after
  SIGKILL the next merge into the same place removes it."""
  _models(tmp_path)
  spec = _spec(tmp_path, method='linear')
  out = tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=REPO)
  process = subprocess.Popen(
    [sys.executable, '-c', _STALLED_MERGE, json.dumps(spec), str(out)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  try:
    assert process.stdout.readline().strip() == 'writing', process.stderr.read()
    partials = [f for f in os.listdir(tmp_path) if f.startswith('.out.partial-')]
    assert partials == [f'.out.partial-{process.pid}']
    process.send_signal(signum)
    process.wait(timeout=60)
  finally:
    process.kill()
  left = [f for f in os.listdir(tmp_path) if f.startswith('.out.partial-')]
  assert not out.exists()
  if signum == signal.SIGTERM:
    assert left == [], process.stderr.read()
    return
  assert left == partials  # SIGKILL cannot be handled
  merge.merge_from_spec(spec, str(out))
  assert [f for f in os.listdir(tmp_path) if f.startswith('.out.partial-')] == []
  assert 'model.safetensors' in os.listdir(out)
