"""Data: byte tokenizer, tfds data sets (code corpus), packed LM batches."""
from curvopt.data._code_corpus import CodeCorpus
from curvopt.data._packing import eval_batches
from curvopt.data._packing import PackedBatches
from curvopt.data._sources import default_data_dir
from curvopt.data._sources import text_source
from curvopt.data._sources import TextSource
from curvopt.data._tokenizer import ByteTokenizer

__all__ = (
    'ByteTokenizer',
    'CodeCorpus',
    'PackedBatches',
    'TextSource',
    'default_data_dir',
    'eval_batches',
    'text_source',
)
