"""Geometry-aware optimizers as optax transforms.

D-Muon (Moonlight, "Muon is Scalable for LLM Training", arXiv 2502.16982) and
LANTON (noise-adaptive layerwise learning rates, arXiv 2510.14009), on LMOs,
Newton-Schulz and parameter groups usable on any pytree; `noise_adaptive` adds
LANTON's noise adaptation alone to any optax transformation.
"""

from curvopt.optim._batched import nuclear_norms_many
from curvopt.optim._batched import orthogonalize_many
from curvopt.optim._clip import clip_by_global_norm
from curvopt.optim._dmuon import ScaleByDmuonState
from curvopt.optim._dmuon import dmuon
from curvopt.optim._dmuon import scale_by_dmuon
from curvopt.optim._groups import EMBED_HEAD
from curvopt.optim._groups import GROUPS
from curvopt.optim._groups import HIDDEN
from curvopt.optim._groups import VECTOR
from curvopt.optim._groups import param_groups
from curvopt.optim._lanton import ScaleByLantonState
from curvopt.optim._lanton import lanton
from curvopt.optim._lanton import lanton_stats
from curvopt.optim._lanton import scale_by_lanton
from curvopt.optim._lmo import LMO
from curvopt.optim._lmo import LMO_NAMES
from curvopt.optim._lmo import bias_rms
from curvopt.optim._lmo import colnorm
from curvopt.optim._lmo import lmo
from curvopt.optim._lmo import rownorm
from curvopt.optim._lmo import sign
from curvopt.optim._lmo import spectral
from curvopt.optim._mapping import DEFAULT_NOISE_MAPPING_OPTIONS
from curvopt.optim._mapping import MAPPING_NAMES
from curvopt.optim._mapping import NORMALISERS
from curvopt.optim._mapping import default_noise_mapping
from curvopt.optim._mapping import mean_ratio
from curvopt.optim._mapping import min_ratio
from curvopt.optim._mapping import ones
from curvopt.optim._matrix import MuonDimensionNumbers
from curvopt.optim._matrix import default_dimension_numbers
from curvopt.optim._newton_schulz import DEFAULT_NS_COEFFS
from curvopt.optim._newton_schulz import NewtonSchulz
from curvopt.optim._newton_schulz import newton_schulz
from curvopt.optim._noise_adaptive import NoiseAdaptiveState
from curvopt.optim._noise_adaptive import noise_adaptive
from curvopt.optim._noise_adaptive import noise_adaptive_stats

__all__ = (
  'DEFAULT_NOISE_MAPPING_OPTIONS',
  'DEFAULT_NS_COEFFS',
  'EMBED_HEAD',
  'GROUPS',
  'HIDDEN',
  'LMO',
  'LMO_NAMES',
  'MAPPING_NAMES',
  'MuonDimensionNumbers',
  'NORMALISERS',
  'NewtonSchulz',
  'NoiseAdaptiveState',
  'ScaleByDmuonState',
  'ScaleByLantonState',
  'VECTOR',
  'bias_rms',
  'clip_by_global_norm',
  'colnorm',
  'default_dimension_numbers',
  'default_noise_mapping',
  'dmuon',
  'lanton',
  'lanton_stats',
  'lmo',
  'mean_ratio',
  'min_ratio',
  'newton_schulz',
  'noise_adaptive',
  'noise_adaptive_stats',
  'nuclear_norms_many',
  'ones',
  'orthogonalize_many',
  'param_groups',
  'rownorm',
  'scale_by_dmuon',
  'scale_by_lanton',
  'sign',
  'spectral',
)
