"""curvopt: curvature-aware optimization of language models in JAX."""
import setuptools

_CORE = [
    'jax>=0.10',
    'flax>=0.12',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12',
    'chex>=0.1.90',
    'tensorflow-datasets>=4.9.10',
    'array_record>=0.8',  # tfds' array_record file format, read without TensorFlow
    'importlib_resources',  # tfds resolves builder code paths through it
    'absl-py',
    'ml_collections',
    'numpy',
    'safetensors',
    'tensorboardX',
    'tqdm',
]
_EXPERIMENTS = ['matplotlib']
_TEST = ['pytest', 'pytest-xdist', 'hypothesis'] + _EXPERIMENTS

setuptools.setup(
    name='curvopt',
    version='0.1.0',
    description='Curvature-aware optimization of language models: LANTON, CAPO, OTA+FFG.',
    packages=setuptools.find_packages(include=['curvopt', 'curvopt.*']),
    python_requires='>=3.11',
    install_requires=_CORE,
    extras_require={
        'experiments': _EXPERIMENTS,
        'test': _TEST,
        'dev': _TEST,
    },
)
