"""Model merging over pytrees: OTA + FFG (curvature-informed) and baselines.

Every operator is a pure function of pytrees with keyword-only options; it
computes in fp32 and returns each leaf in its input dtype. Each has a
per-leaf core (`*_leaf`) that a streaming merge can call one tensor at a
time; FFG's global threshold is its own function (`ffg_threshold`).
Readers (safetensors, orbax, in-memory trees) and writers feed
`merge_streaming`, which holds a few tensors at a time.

Papers: OTA and FFG (arXiv 2509.11167); TIES (arXiv 2306.01708); DARE
(arXiv 2311.03099); task arithmetic (arXiv 2212.04089); Fisher merging
(arXiv 2111.09832).
"""

from curvopt.merge._dare import COMBINES
from curvopt.merge._dare import dare
from curvopt.merge._dare import dare_keep_masks
from curvopt.merge._dare import dare_leaf
from curvopt.merge._dare import leaf_key
from curvopt.merge._estimate_fisher import estimate_fisher
from curvopt.merge._ffg import QUANTILES
from curvopt.merge._ffg import SCOPES
from curvopt.merge._ffg import SCORES
from curvopt.merge._ffg import ffg_graft
from curvopt.merge._ffg import ffg_graft_leaf
from curvopt.merge._ffg import ffg_mask
from curvopt.merge._ffg import ffg_mask_leaf
from curvopt.merge._ffg import ffg_saliency
from curvopt.merge._ffg import ffg_threshold
from curvopt.merge._fisher_merge import fisher
from curvopt.merge._fisher_merge import fisher_leaf
from curvopt.merge._io_orbax import OrbaxMomentsReader
from curvopt.merge._io_orbax import OrbaxReader
from curvopt.merge._io_orbax import OrbaxWriter
from curvopt.merge._io_orbax import orbax_moments_reader
from curvopt.merge._io_orbax import orbax_params_reader
from curvopt.merge._io_orbax import save_orbax
from curvopt.merge._io_safetensors import SafetensorsReader
from curvopt.merge._io_safetensors import SafetensorsWriter
from curvopt.merge._io_safetensors import exp_avg_sq_reader
from curvopt.merge._io_safetensors import save_safetensors
from curvopt.merge._io_torch import TrainerMomentsReader
from curvopt.merge._io_torch import trainer_moments_reader
from curvopt.merge._linear import linear
from curvopt.merge._linear import linear_leaf
from curvopt.merge._linear import task_arithmetic
from curvopt.merge._linear import task_arithmetic_leaf
from curvopt.merge._lowrank import lowrank_moment
from curvopt.merge._lowrank import lowrank_moment_leaf
from curvopt.merge._mergekit import spec_from_mergekit
from curvopt.merge._ota import NORMALISE
from curvopt.merge._ota import ota
from curvopt.merge._ota import ota_expert_weight
from curvopt.merge._ota import ota_leaf
from curvopt.merge._ota_ffg import ota_ffg
from curvopt.merge._output_dir import Interrupted
from curvopt.merge._output_dir import remove_stale_partials
from curvopt.merge._rank1 import Rank1
from curvopt.merge._rank1 import rank1_compress
from curvopt.merge._rank1 import rank1_compress_leaf
from curvopt.merge._rank1 import rank1_expand
from curvopt.merge._rank1 import rank1_expand_leaf
from curvopt.merge._run import DEFAULT_SHARD_BYTES
from curvopt.merge._run import merge_from_spec
from curvopt.merge._run import open_moments
from curvopt.merge._run import open_reader
from curvopt.merge._sources import LeafReader
from curvopt.merge._sources import TreeReader
from curvopt.merge._stream_cutoff import StreamedCutoff
from curvopt.merge._streaming import EXTRA_TENSORS
from curvopt.merge._streaming import METHODS
from curvopt.merge._streaming import MemoryWriter
from curvopt.merge._streaming import StreamResult
from curvopt.merge._streaming import merge_streaming
from curvopt.merge._streaming import method_options
from curvopt.merge._ties import ties
from curvopt.merge._ties import ties_leaf

__all__ = (
  'COMBINES',
  'DEFAULT_SHARD_BYTES',
  'EXTRA_TENSORS',
  'Interrupted',
  'LeafReader',
  'METHODS',
  'MemoryWriter',
  'NORMALISE',
  'QUANTILES',
  'OrbaxMomentsReader',
  'OrbaxReader',
  'OrbaxWriter',
  'Rank1',
  'SCOPES',
  'SCORES',
  'SafetensorsReader',
  'SafetensorsWriter',
  'StreamResult',
  'StreamedCutoff',
  'TrainerMomentsReader',
  'TreeReader',
  'dare',
  'dare_keep_masks',
  'dare_leaf',
  'estimate_fisher',
  'exp_avg_sq_reader',
  'ffg_graft',
  'ffg_graft_leaf',
  'ffg_mask',
  'ffg_mask_leaf',
  'ffg_saliency',
  'ffg_threshold',
  'fisher',
  'fisher_leaf',
  'leaf_key',
  'linear',
  'linear_leaf',
  'lowrank_moment',
  'lowrank_moment_leaf',
  'merge_from_spec',
  'merge_streaming',
  'method_options',
  'open_moments',
  'open_reader',
  'orbax_moments_reader',
  'orbax_params_reader',
  'ota',
  'ota_expert_weight',
  'ota_ffg',
  'ota_leaf',
  'rank1_compress',
  'rank1_compress_leaf',
  'rank1_expand',
  'rank1_expand_leaf',
  'remove_stale_partials',
  'save_orbax',
  'save_safetensors',
  'spec_from_mergekit',
  'task_arithmetic',
  'task_arithmetic_leaf',
  'ties',
  'ties_leaf',
  'trainer_moments_reader',
)
