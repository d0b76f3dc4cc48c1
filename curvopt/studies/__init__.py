"""Studies: LM sweeps with paired seed statistics, the RL and merging studies, their reports."""

from curvopt.studies._capo_calibration import capo_calibration
from curvopt.studies._capo_calibration import peak_rate_step
from curvopt.studies._merge_gain_study import Decision
from curvopt.studies._merge_gain_study import GainStudy
from curvopt.studies._merge_gain_study import ModelSpec
from curvopt.studies._merge_gain_study import StudyStopped
from curvopt.studies._merge_gain_study import decide
from curvopt.studies._merge_gain_study import gain_models
from curvopt.studies._merge_gain_study import gain_study_report
from curvopt.studies._merge_gain_study import run_gain_study
from curvopt.studies._merge_gain_study import task_means
from curvopt.studies._merge_metrics import Comparison
from curvopt.studies._merge_metrics import Estimate
from curvopt.studies._merge_metrics import accuracy_estimate
from curvopt.studies._merge_metrics import best_setting
from curvopt.studies._merge_metrics import choose_rate
from curvopt.studies._merge_metrics import compare_to_baselines
from curvopt.studies._merge_metrics import gain_estimate
from curvopt.studies._merge_metrics import gain_kept
from curvopt.studies._merge_metrics import knee_threshold
from curvopt.studies._merge_metrics import mask_density
from curvopt.studies._merge_metrics import mean_over_tasks
from curvopt.studies._merge_metrics import relative_size
from curvopt.studies._merge_metrics import seed_spread
from curvopt.studies._merge_metrics import task_vector_cosine
from curvopt.studies._merge_metrics import within_points
from curvopt.studies._merge_study import MergeStudy
from curvopt.studies._merge_study import cosine_similarity
from curvopt.studies._merge_study import layer_type
from curvopt.studies._merge_study import mask_concentration
from curvopt.studies._merge_study import mask_jaccard
from curvopt.studies._merge_study import merge_study_report
from curvopt.studies._merge_study import normalized_scores
from curvopt.studies._merge_study import run_merge_study
from curvopt.studies._report import curve
from curvopt.studies._report import curves
from curvopt.studies._report import markdown_table
from curvopt.studies._report import plot_curves
from curvopt.studies._report import plot_heatmap
from curvopt.studies._report import run_summary
from curvopt.studies._report import write_text
from curvopt.studies._rl_study import BaselineGain
from curvopt.studies._rl_study import baseline_gain
from curvopt.studies._rl_study import bootstrap_ratio
from curvopt.studies._rl_study import collapse_index
from curvopt.studies._rl_study import finished_seeds
from curvopt.studies._rl_study import is_collapsed
from curvopt.studies._rl_study import largest_drop
from curvopt.studies._rl_study import rl_study_report
from curvopt.studies._rl_study import run_rl_study
from curvopt.studies._rl_study import sample_efficiency
from curvopt.studies._rl_study import seeds_of
from curvopt.studies._rl_study import study_run_dir
from curvopt.studies._stats import PairedDifference
from curvopt.studies._stats import paired_difference
from curvopt.studies._stats import t_quantile
from curvopt.studies._sweep import BASE_OVERRIDES
from curvopt.studies._sweep import SweepPoint
from curvopt.studies._sweep import best_point
from curvopt.studies._sweep import comparison_table
from curvopt.studies._sweep import paired_comparisons
from curvopt.studies._sweep import parse_comparisons
from curvopt.studies._sweep import run_sweep
from curvopt.studies._sweep import steps_to_reach
from curvopt.studies._sweep import sweep_report
from curvopt.studies._sweep import sweep_run_dir
from curvopt.studies._sweep import sweep_summary

__all__ = (
  'BASE_OVERRIDES',
  'BaselineGain',
  'Comparison',
  'Decision',
  'Estimate',
  'GainStudy',
  'MergeStudy',
  'ModelSpec',
  'PairedDifference',
  'StudyStopped',
  'SweepPoint',
  'accuracy_estimate',
  'baseline_gain',
  'best_point',
  'best_point',
  'best_setting',
  'bootstrap_ratio',
  'capo_calibration',
  'choose_rate',
  'collapse_index',
  'compare_to_baselines',
  'comparison_table',
  'cosine_similarity',
  'curve',
  'curves',
  'decide',
  'finished_seeds',
  'gain_estimate',
  'gain_kept',
  'gain_models',
  'gain_study_report',
  'is_collapsed',
  'is_collapsed',
  'knee_threshold',
  'largest_drop',
  'layer_type',
  'markdown_table',
  'mask_concentration',
  'mask_density',
  'mask_jaccard',
  'mean_over_tasks',
  'merge_study_report',
  'normalized_scores',
  'paired_comparisons',
  'paired_difference',
  'parse_comparisons',
  'peak_rate_step',
  'plot_curves',
  'plot_heatmap',
  'relative_size',
  'rl_study_report',
  'run_gain_study',
  'run_merge_study',
  'run_rl_study',
  'run_summary',
  'run_sweep',
  'sample_efficiency',
  'seed_spread',
  'seeds_of',
  'steps_to_reach',
  'study_run_dir',
  'sweep_report',
  'sweep_run_dir',
  'sweep_summary',
  't_quantile',
  'task_means',
  'task_vector_cosine',
  'within_points',
  'write_text',
)
