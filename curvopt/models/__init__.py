"""Reference LLaMA-style decoder (flax.linen) for the experiments and tests.

The LLaMA architecture (arXiv 2302.13971): pre-norm RMSNorm (arXiv 1910.07467), rotary
position embeddings (RoPE, arXiv 2104.09864) and SwiGLU feed-forward layers
(arXiv 2002.05202). Hugging Face Llama, Qwen2 and Mistral checkpoints load into it
(`load_hf`) and save back (`save_hf`).
"""

from curvopt.models._attention import causal_padding_mask
from curvopt.models._attention import dot_product_attention
from curvopt.models._cache import init_cache
from curvopt.models._config import PRESET_NAMES
from curvopt.models._config import DecoderConfig
from curvopt.models._config import RopeScaling
from curvopt.models._config import model_config
from curvopt.models._decoder import Decoder
from curvopt.models._hf import load_hf
from curvopt.models._hf import read_hf_config
from curvopt.models._hf import save_hf
from curvopt.models._hf_config import HF_FAMILIES
from curvopt.models._hf_config import config_from_hf
from curvopt.models._hf_config import config_to_hf
from curvopt.models._params import count_params
from curvopt.models._params import output_head
from curvopt.models._policy import decode_fn_for
from curvopt.models._rope import positions_from_mask

__all__ = (
  'DecoderConfig',
  'Decoder',
  'HF_FAMILIES',
  'PRESET_NAMES',
  'RopeScaling',
  'causal_padding_mask',
  'config_from_hf',
  'config_to_hf',
  'count_params',
  'decode_fn_for',
  'dot_product_attention',
  'init_cache',
  'load_hf',
  'model_config',
  'output_head',
  'positions_from_mask',
  'read_hf_config',
  'save_hf',
)
