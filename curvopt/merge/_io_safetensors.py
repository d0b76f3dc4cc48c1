"""HF-layout safetensors: lazy readers and a bounded-memory sharded writer.

Layouts read:
- one file (`model.safetensors`, `export/exp_avg_sq.safetensors`, ...);
- a directory holding `<stem>.safetensors`, or shards listed by
  `<stem>.safetensors.index.json` (`{"weight_map": {name: shard file}}`),
  as `save_pretrained` writes them;
- the published OTA experts' second moments: `exp_avg_sq_reader(expert_dir)`
  finds `export/exp_avg_sq.safetensors` (raw fp32 `exp_avg_sq`, no bias
  correction, keyed by the weights' tensor names).

Tensors are read with `safe_open(...).get_tensor(name)`, the file mapped
only while a batch is read, so a reader never holds more than the tensors
asked for.

The writer plans every shard (tensor order, offsets, header) from the
output specs before any value exists, writes the headers up front and
each tensor's bytes at its offset as it arrives: memory is bounded by one
tensor, not by a shard, and a shard is never rewritten.
"""

import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import safetensors

from curvopt.merge import _sources

INDEX_SUFFIX = '.safetensors.index.json'
# numpy dtype name -> safetensors dtype string.
_DTYPES = {
  'float64': 'F64',
  'float32': 'F32',
  'float16': 'F16',
  'bfloat16': 'BF16',
  'int64': 'I64',
  'int32': 'I32',
  'int16': 'I16',
  'int8': 'I8',
  'uint64': 'U64',
  'uint32': 'U32',
  'uint16': 'U16',
  'uint8': 'U8',
  'bool': 'BOOL',
  'float8_e4m3fn': 'F8_E4M3',
  'float8_e5m2': 'F8_E5M2',
}
_NP_DTYPES = {v: k for k, v in _DTYPES.items()}


def _np_dtype(st_dtype: str, *, name: str, path: str) -> np.dtype:
  if st_dtype not in _NP_DTYPES:
    raise ValueError(
      f'tensor {name!r} in {path} has dtype {st_dtype}, which '
      f'curvopt cannot read; readable: {sorted(_NP_DTYPES)}'
    )
  return jax.numpy.dtype(_NP_DTYPES[st_dtype])


def _read_header(path: str) -> dict[str, Any]:
  """The JSON header of a safetensors file, checked against the file's size
  so that a truncated file fails here, with its name, and not mid-merge."""
  with open(path, 'rb') as f:
    size_bytes = f.read(8)
    if len(size_bytes) != 8:
      raise ValueError(f'{path} is not a safetensors file (shorter than 8 bytes)')
    size = int.from_bytes(size_bytes, 'little')
    file_size = os.fstat(f.fileno()).st_size
    if 8 + size > file_size:
      raise ValueError(
        f'{path} is truncated or not a safetensors file: its header claims {size} bytes, the file '
        f'has {file_size}'
      )
    try:
      header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{path} is not a safetensors file (bad header)') from e
  if not isinstance(header, dict):
    raise ValueError(f'{path} is not a safetensors file (bad header)')
  ends = [
    entry['data_offsets'][1]
    for name, entry in header.items()
    if name != '__metadata__' and isinstance(entry, dict) and 'data_offsets' in entry
  ]
  need = 8 + size + max(ends, default=0)
  if need > file_size:
    raise ValueError(
      f'{path} is truncated: its tensors need {need} bytes, the file has {file_size} (an '
      'interrupted download or copy?)'
    )
  return header


def _resolve(path: str, stem: str) -> tuple[dict[str, str], str]:
  """(tensor name -> shard file, description) for a file, index or dir."""
  path = os.fspath(path)
  if os.path.isdir(path):
    index = os.path.join(path, stem + INDEX_SUFFIX)
    single = os.path.join(path, stem + '.safetensors')
    if os.path.exists(index):
      path = index
    elif os.path.exists(single):
      path = single
    else:
      found = sorted(
        f for f in os.listdir(path) if f.endswith('.safetensors') or f.endswith(INDEX_SUFFIX)
      )
      raise ValueError(
        f'{path} holds neither {stem}.safetensors nor '
        f'{stem}{INDEX_SUFFIX}; safetensors files there: '
        f'{found}'
      )
  if not os.path.exists(path):
    raise ValueError(f'no safetensors file or index at {path}')
  if path.endswith('.json'):
    with open(path) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'{path} has no "weight_map" of tensor names to shard files')
    folder = os.path.dirname(path)
    return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}, path
  header = _read_header(path)
  return {name: path for name in header if name != '__metadata__'}, path


class SafetensorsReader(_sources.LeafReader):
  """Tensors of one safetensors file, a sharded index, or a model dir."""

  def __init__(self, path: str, *, stem: str = 'model'):
    """Opens the headers only.

    Args:
      path: a `.safetensors` file, a `.safetensors.index.json`, or a
        directory holding `<stem>.safetensors` or `<stem>` shards + index.
      stem: file stem looked for in a directory ('model').

    Raises:
      ValueError: nothing readable at `path`, a shard listed by the index
        that is missing or lacks its tensor, or an unreadable dtype.
    """
    files, self.description = _resolve(path, stem)
    self._files = files
    self._specs = {}
    headers = {}
    for shard in sorted(set(files.values())):
      if not os.path.exists(shard):
        raise ValueError(f'shard {shard} listed by {self.description} does not exist')
      headers[shard] = _read_header(shard)
    # Index order is arbitrary; storage order (by shard, then by offset)
    # makes a sequential streaming read.
    order = sorted(
      files, key=lambda n: (files[n], headers[files[n]].get(n, {}).get('data_offsets', [0])[0])
    )
    for name in order:
      entry = headers[files[name]].get(name)
      if entry is None:
        raise ValueError(
          f'{files[name]} lacks the tensor {name!r} that {self.description} maps to it'
        )
      dtype = _np_dtype(entry['dtype'], name=name, path=files[name])
      self._specs[name] = jax.ShapeDtypeStruct(tuple(entry['shape']), dtype)

  def _read(self, names):
    # safe_open maps the whole file and pages read stay resident while it is
    # open: open per call, so a streaming merge's RSS is one batch, not the
    # bytes read so far.
    by_shard: dict[str, list[str]] = {}
    for name in names:
      by_shard.setdefault(self._files[name], []).append(name)
    out = {}
    for shard, shard_names in by_shard.items():
      with safetensors.safe_open(shard, framework='numpy') as f:
        for name in shard_names:
          out[name] = f.get_tensor(name)
    return {name: out[name] for name in names}


def exp_avg_sq_reader(path: str) -> SafetensorsReader:
  """The second moments of an HF-layout expert (the OTA experts' layout).

  Args:
    path: an `exp_avg_sq` safetensors file or index, or an expert directory
      holding `export/exp_avg_sq.safetensors` (or `exp_avg_sq.safetensors`,
      or `exp_avg_sq` shards with their index) directly.

  Returns:
    A reader of the raw `exp_avg_sq` tensors keyed by weight names.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for folder in (os.path.join(path, 'export'), path):
      if os.path.exists(os.path.join(folder, 'exp_avg_sq.safetensors')) or os.path.exists(
        os.path.join(folder, 'exp_avg_sq' + INDEX_SUFFIX)
      ):
        return SafetensorsReader(folder, stem='exp_avg_sq')
    raise ValueError(
      f'{path} holds no export/exp_avg_sq.safetensors nor '
      'exp_avg_sq.safetensors; second moments of an expert '
      'without them can be estimated with '
      'curvopt.merge.estimate_fisher'
    )
  return SafetensorsReader(path)


def _st_dtype(dtype: Any, name: str) -> str:
  key = np.dtype(dtype).name
  if key not in _DTYPES:
    raise ValueError(
      f'tensor {name!r} has dtype {key}, which safetensors '
      f'cannot store; storable: {sorted(_DTYPES)}'
    )
  return _DTYPES[key]


class SafetensorsWriter:
  """Writes named tensors, in any order, into planned safetensors shards.

  All names, shapes and dtypes are given up front (a merge knows them from
  its base); shards are filled in the given order up to `max_shard_bytes`
  (a tensor larger than that gets a shard of its own). With one shard the
  file is `<stem>.safetensors`; with several,
  `<stem>-0000i-of-0000n.safetensors` plus `<stem>.safetensors.index.json`.
  Headers are written when the writer opens; `close` checks that every
  tensor was written and writes the index.
  """

  def __init__(
    self,
    directory: str,
    specs: Mapping[str, Any] | Sequence[tuple[str, Any]],
    *,
    max_shard_bytes: int | None = None,
    stem: str = 'model',
    metadata: Mapping[str, str] | None = None,
  ):
    """Plans the shards and writes their headers.

    Args:
      directory: an existing directory the shards are written into.
      specs: name -> anything with `.shape` and `.dtype` (arrays,
        `jax.ShapeDtypeStruct`), in output order.
      max_shard_bytes: the largest shard (data bytes); None: one file.
      stem: output file stem ('model').
      metadata: string metadata stored in every header (`format: pt` is
        added, as transformers expects).
    """
    if max_shard_bytes is not None and max_shard_bytes <= 0:
      raise ValueError(f'max_shard_bytes must be > 0, got {max_shard_bytes}')
    items = list(specs.items() if isinstance(specs, Mapping) else specs)
    if not items:
      raise ValueError('SafetensorsWriter needs at least one tensor')
    shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    size = 0
    for name, spec in items:
      dtype = _st_dtype(spec.dtype, name)
      shape = tuple(int(d) for d in spec.shape)
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
      if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append((name, dtype, shape, nbytes))
      size += nbytes
    self.directory = os.fspath(directory)
    self._stem = stem
    count = len(shards)
    self.files = (
      [f'{stem}.safetensors']
      if count == 1
      else [f'{stem}-{i + 1:05d}-of-{count:05d}.safetensors' for i in range(count)]
    )
    self._meta = {'format': 'pt', **dict(metadata or {})}
    self._where: dict[str, tuple[int, int, int, str, tuple]] = {}
    self._fds: list[int] = []
    self.total_bytes = 0
    for shard, file in zip(shards, self.files):
      header: dict[str, Any] = {'__metadata__': self._meta}
      offset = 0
      for name, dtype, shape, nbytes in shard:
        header[name] = {
          'dtype': dtype,
          'shape': list(shape),
          'data_offsets': [offset, offset + nbytes],
        }
        offset += nbytes
      raw = json.dumps(header, separators=(',', ':')).encode()
      raw += b' ' * (-len(raw) % 8)
      start = 8 + len(raw)
      fd = os.open(os.path.join(self.directory, file), os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
      os.write(fd, len(raw).to_bytes(8, 'little') + raw)
      os.ftruncate(fd, start + offset)
      for name, dtype, shape, nbytes in shard:
        begin = header[name]['data_offsets'][0]
        self._where[name] = (len(self._fds), start + begin, nbytes, dtype, shape)
      self._fds.append(fd)
      self.total_bytes += offset
    self._written: set[str] = set()

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._where)

  def write(self, name: str, value: Any) -> None:
    """Writes one tensor (a numpy or fully addressable jax array)."""
    if name not in self._where:
      raise ValueError(f"tensor {name!r} is not among the writer's planned tensors")
    if name in self._written:
      raise ValueError(f'tensor {name!r} was already written')
    shard, offset, nbytes, dtype, shape = self._where[name]
    array = np.ascontiguousarray(np.asarray(jax.device_get(value)))
    if tuple(array.shape) != shape or _st_dtype(array.dtype, name) != dtype:
      raise ValueError(
        f'tensor {name!r} has shape {array.shape} and dtype '
        f'{array.dtype}; the writer planned {shape} '
        f'{_NP_DTYPES[dtype]}'
      )
    view = memoryview(array.reshape(-1).view(np.uint8))
    done = 0
    while done < nbytes:
      done += os.pwrite(self._fds[shard], view[done:], offset + done)
    self._written.add(name)

  def close(self) -> None:
    """Checks that every tensor was written; writes the index if sharded."""
    for fd in self._fds:
      os.close(fd)
    self._fds = []
    missing = [n for n in self._where if n not in self._written]
    if missing:
      raise ValueError(f'{len(missing)} planned tensors were never written, e.g. {missing[:5]}')
    if len(self.files) > 1:
      index = {
        'metadata': {'total_size': self.total_bytes},
        'weight_map': {name: self.files[where[0]] for name, where in self._where.items()},
      }
      with open(os.path.join(self.directory, self._stem + INDEX_SUFFIX), 'w') as f:
        json.dump(index, f, indent=2)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self.close()
    else:
      for fd in self._fds:
        os.close(fd)
      self._fds = []


def save_safetensors(
  directory: str,
  tensors: Mapping[str, Any] | Any,
  *,
  max_shard_bytes: int | None = None,
  stem: str = 'model',
  metadata: Mapping[str, str] | None = None,
) -> list[str]:
  """Writes a dict of named tensors, or a pytree ('/'-joined leaf names).

  Args:
    directory: an existing directory.
    tensors: {name: array} or any pytree of arrays.
    max_shard_bytes: shard size limit; None: one file.
    stem: output file stem.
    metadata: string metadata for the headers.

  Returns:
    The files written (shards; the index too when sharded).
  """
  reader = _sources.TreeReader(tensors)
  flat = reader.read(reader.names)
  with SafetensorsWriter(
    directory, flat, max_shard_bytes=max_shard_bytes, stem=stem, metadata=metadata
  ) as writer:
    for name, value in flat.items():
      writer.write(name, value)
  return writer.files + ([stem + INDEX_SUFFIX] if len(writer.files) > 1 else [])
