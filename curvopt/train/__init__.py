"""Trainer plumbing: state, jit'd steps, sharding, checkpoints, metrics; LM, SFT and RL trainers."""

from curvopt.train._checkpoint import Checkpointer
from curvopt.train._checkpoint import abstract_like
from curvopt.train._configs import load_config
from curvopt.train._distributed import define_distributed_flags
from curvopt.train._distributed import initialize_distributed
from curvopt.train._lm import RunResult
from curvopt.train._lm import train_lm
from curvopt.train._loop import NonFiniteError
from curvopt.train._metrics import MetricWriter
from curvopt.train._metrics import Progress
from curvopt.train._metrics import quiet_library_logs
from curvopt.train._metrics import read_metrics
from curvopt.train._optimizers import OPTIMIZERS
from curvopt.train._optimizers import make_optimizer
from curvopt.train._rl import CAPO_TOKENS_DIR
from curvopt.train._rl import PromptStream
from curvopt.train._rl import RLResult
from curvopt.train._rl import check_rl_config
from curvopt.train._rl import train_rl
from curvopt.train._rl_premise import PremiseResult
from curvopt.train._rl_premise import capo_premise_check
from curvopt.train._rl_premise import spearman
from curvopt.train._rl_step import MASK_MODES
from curvopt.train._rl_step import RLState
from curvopt.train._rl_step import make_rl_step
from curvopt.train._rl_step import rollout_batch
from curvopt.train._rollout import Rollout
from curvopt.train._schedules import SCHEDULES
from curvopt.train._schedules import make_schedule
from curvopt.train._setup import model_config_from
from curvopt.train._setup import resolve_dtype
from curvopt.train._sft import SftResult
from curvopt.train._sft import restore_params
from curvopt.train._sft import train_sft
from curvopt.train._sharding import batch_sharding
from curvopt.train._sharding import fsdp_shardings
from curvopt.train._sharding import fsdp_spec
from curvopt.train._sharding import make_mesh
from curvopt.train._sharding import put_global_batch
from curvopt.train._state import TrainState
from curvopt.train._step import lm_loss
from curvopt.train._step import make_eval_step
from curvopt.train._step import make_init_state
from curvopt.train._step import make_train_step

__all__ = (
  'CAPO_TOKENS_DIR',
  'Checkpointer',
  'MASK_MODES',
  'MetricWriter',
  'NonFiniteError',
  'OPTIMIZERS',
  'PremiseResult',
  'Progress',
  'PromptStream',
  'RLResult',
  'RLState',
  'Rollout',
  'RunResult',
  'SCHEDULES',
  'SftResult',
  'TrainState',
  'abstract_like',
  'batch_sharding',
  'capo_premise_check',
  'check_rl_config',
  'define_distributed_flags',
  'fsdp_shardings',
  'fsdp_spec',
  'initialize_distributed',
  'lm_loss',
  'load_config',
  'make_eval_step',
  'make_init_state',
  'make_mesh',
  'make_optimizer',
  'make_rl_step',
  'make_schedule',
  'make_train_step',
  'model_config_from',
  'put_global_batch',
  'quiet_library_logs',
  'read_metrics',
  'resolve_dtype',
  'restore_params',
  'rollout_batch',
  'spearman',
  'train_lm',
  'train_rl',
  'train_sft',
)
