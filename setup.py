"""curvopt: curvature-aware optimization of language models in JAX."""

import setuptools

# The core install is what the method packages (`curvopt.optim`, `curvopt.rl`, `curvopt.merge`)
# and the model (`curvopt.models`) import: usable on any pytree in another project.
_CORE = [
  'jax>=0.10',
  'flax>=0.12',
  'optax>=0.2.8',
  'orbax-checkpoint>=0.12',  # merge: second moments out of orbax checkpoints; orbax writer
  'safetensors',  # merge: HF-layout readers and writers
  'numpy',
]
# The data and trainer stack: `curvopt.data`, `curvopt.train` and the experiment binaries.
_TRAIN = [
  'tensorflow-datasets>=4.9.10',
  'array_record>=0.8',  # tfds' array_record file format, read without TensorFlow
  'importlib_resources',  # tfds resolves builder code paths through it
  'ml_collections',
  'absl-py',
  'tensorboardX',
  'tqdm',
  'pyyaml',  # mergekit YAML configs for the merge binary
]
# Hugging Face tokenizers (`curvopt.data.HFTokenizer`: tokenizer.json, chat templates). Models
# load and save without it (`curvopt.models.load_hf` reads safetensors, a core dependency).
_HF = ['tokenizers>=0.15', 'jinja2>=3.1']
# Studies, reports and plots (`curvopt.studies`, experiments/demo.py).
_EXPERIMENTS = _TRAIN + ['matplotlib']
# Optional readers: a Hugging Face Trainer checkpoint's optimizer.pt (curvopt.merge), imported
# only when such a file is read; transformers rebuilds its parameter order from config.json.
_TORCH = ['torch']
_TRANSFORMERS = _TORCH + ['transformers']
# The test suite and the lint check that CI runs after it (.ci/run).
_TEST = _EXPERIMENTS + _HF + ['pytest', 'pytest-xdist', 'hypothesis', 'chex>=0.1.90', 'ruff']

setuptools.setup(
  name='curvopt',
  version='0.1.0',
  description='Curvature-aware optimization of language models: LANTON, CAPO, OTA+FFG.',
  license='Apache-2.0',
  packages=setuptools.find_packages(include=['curvopt', 'curvopt.*']),
  python_requires='>=3.11',
  install_requires=_CORE,
  extras_require={
    'train': _TRAIN,
    'hf': _HF,
    'experiments': _EXPERIMENTS,
    'torch': _TORCH,
    'transformers': _TRANSFORMERS,
    'test': _TEST,
    'dev': _TEST,
  },
)
