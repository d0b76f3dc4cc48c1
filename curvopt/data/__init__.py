"""Data: tokenizers (bytes; Hugging Face tokenizer.json), tfds data sets (code corpus, synthetic
tasks), GSM8K-style JSONL task files, LM and task batches."""

from curvopt.data._code_corpus import CodeCorpus
from curvopt.data._hf_tokenizer import HFTokenizer
from curvopt.data._packing import PackedBatches
from curvopt.data._packing import eval_batches
from curvopt.data._permutation import IndexPermutation
from curvopt.data._sources import TextSource
from curvopt.data._sources import default_data_dir
from curvopt.data._sources import text_source
from curvopt.data._task_batches import TaskBatches
from curvopt.data._task_batches import prompt_batch
from curvopt.data._tasks import ALL_TASKS
from curvopt.data._tasks import ARITHMETIC_TASKS
from curvopt.data._tasks import JSONL_PREFIX
from curvopt.data._tasks import TASK_NAMES
from curvopt.data._tasks import CurvoptTasks
from curvopt.data._tasks import TaskSource
from curvopt.data._tasks import arithmetic_task
from curvopt.data._tasks import jsonl_task_source
from curvopt.data._tasks import task_source
from curvopt.data._tokenizer import ByteTokenizer
from curvopt.data._tokenizer import Tokenizer

__all__ = (
  'ALL_TASKS',
  'ARITHMETIC_TASKS',
  'ByteTokenizer',
  'CodeCorpus',
  'CurvoptTasks',
  'HFTokenizer',
  'IndexPermutation',
  'JSONL_PREFIX',
  'PackedBatches',
  'TASK_NAMES',
  'TaskBatches',
  'TaskSource',
  'TextSource',
  'Tokenizer',
  'arithmetic_task',
  'default_data_dir',
  'eval_batches',
  'jsonl_task_source',
  'prompt_batch',
  'task_source',
  'text_source',
)
