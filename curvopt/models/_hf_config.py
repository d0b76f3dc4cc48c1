"""Hugging Face `config.json` <-> DecoderConfig for the Llama, Qwen2 and Mistral families.

Every field of a config is either mapped, checked to hold a value the decoder computes
exactly, or known not to change the model (metadata, generation defaults, initialization);
anything else raises, naming the field, so that no setting is silently dropped. Both ways
transformers writes RoPE settings are read: 4.x's top-level `rope_theta` and `rope_scaling`,
and 5.x's `rope_parameters`.
"""

from typing import Any, Mapping, Optional

from curvopt.models import _config

HF_FAMILIES = ('llama', 'mistral', 'qwen2')
_ARCHITECTURES = {
  'llama': 'LlamaForCausalLM',
  'mistral': 'MistralForCausalLM',
  'qwen2': 'Qwen2ForCausalLM',
}
# Fields every family reads; each is mapped or checked in config_from_hf.
_MODEL_FIELDS = frozenset(
  {
    'vocab_size',
    'hidden_size',
    'intermediate_size',
    'num_hidden_layers',
    'num_attention_heads',
    'num_key_value_heads',
    'head_dim',
    'hidden_act',
    'max_position_embeddings',
    'rms_norm_eps',
    'tie_word_embeddings',
    'rope_theta',
    'rope_scaling',
    'rope_parameters',
    'partial_rotary_factor',
    'attention_dropout',
    'layer_types',
  }
)
_FAMILY_FIELDS = {
  'llama': frozenset({'attention_bias', 'mlp_bias'}),
  'mistral': frozenset({'sliding_window'}),
  'qwen2': frozenset({'use_sliding_window', 'sliding_window', 'max_window_layers'}),
}
# Fields that do not change the forward pass: checkpoint metadata, token ids (the tokenizer's
# business), initialization, generation defaults, and options of transformers' own code
# (pretraining_tp splits the same matmuls into slices).
_INERT_FIELDS = frozenset(
  {
    '_name_or_path',
    '_commit_hash',
    '_attn_implementation_autoset',
    'architectures',
    'model_type',
    'transformers_version',
    'torch_dtype',
    'dtype',
    'use_cache',
    'initializer_range',
    'pretraining_tp',
    'bos_token_id',
    'eos_token_id',
    'pad_token_id',
    'sep_token_id',
    'decoder_start_token_id',
    'forced_bos_token_id',
    'forced_eos_token_id',
    'id2label',
    'label2id',
    'problem_type',
    'finetuning_task',
    'tokenizer_class',
    'prefix',
    'task_specific_params',
    'return_dict',
    'output_hidden_states',
    'output_attentions',
    'torchscript',
    'use_bfloat16',
    'tf_legacy_loss',
    'pruned_heads',
    'chunk_size_feed_forward',
    'is_encoder_decoder',
    'is_decoder',
    'add_cross_attention',
    'tie_encoder_decoder',
    'cross_attention_hidden_size',
    'max_length',
    'min_length',
    'do_sample',
    'early_stopping',
    'num_beams',
    'num_beam_groups',
    'diversity_penalty',
    'temperature',
    'top_k',
    'top_p',
    'typical_p',
    'repetition_penalty',
    'length_penalty',
    'no_repeat_ngram_size',
    'encoder_no_repeat_ngram_size',
    'bad_words_ids',
    'num_return_sequences',
    'output_scores',
    'return_dict_in_generate',
    'remove_invalid_values',
    'exponential_decay_length_penalty',
    'suppress_tokens',
    'begin_suppress_tokens',
  }
)
# Fields of other architectures that people may expect to work, with the reason they do not.
_UNSUPPORTED_FIELDS = {
  'quantization_config': 'quantized checkpoints are not supported; load an unquantized one',
  'num_experts': 'mixture-of-experts models are not supported',
  'num_local_experts': 'mixture-of-experts models are not supported',
  'num_experts_per_tok': 'mixture-of-experts models are not supported',
  'moe_intermediate_size': 'mixture-of-experts models are not supported',
  'use_mrope': 'multimodal RoPE is not supported',
}
_ROPE_TYPES = ('default', 'llama3')
_LLAMA3_KEYS = ('factor', 'low_freq_factor', 'high_freq_factor')


def _field_error(field: str, message: str) -> ValueError:
  return ValueError(f'Hugging Face config field {field!r}: {message}')


def _family(hf: Mapping[str, Any]) -> str:
  family = hf.get('model_type')
  if family not in HF_FAMILIES:
    raise _field_error(
      'model_type', f'unknown architecture {family!r}; supported model_type values: {HF_FAMILIES}'
    )
  architectures = hf.get('architectures')
  if architectures is not None and list(architectures) != [_ARCHITECTURES[family]]:
    raise _field_error(
      'architectures',
      f'{architectures!r} is not a causal LM of model_type {family!r}; expected '
      f'[{_ARCHITECTURES[family]!r}]',
    )
  return family


def _check_fields(hf: Mapping[str, Any], family: str) -> None:
  for field, reason in _UNSUPPORTED_FIELDS.items():
    if hf.get(field) not in (None, False, 0):
      raise _field_error(field, reason)
  known = _MODEL_FIELDS | _FAMILY_FIELDS[family] | _INERT_FIELDS | set(_UNSUPPORTED_FIELDS)
  unknown = sorted(set(hf) - known)
  if unknown:
    raise ValueError(
      f'Hugging Face config field(s) {unknown} are unknown to curvopt for model_type '
      f'{family!r}: they may change the model, so it is not loaded (fields read: '
      f'{sorted(_MODEL_FIELDS | _FAMILY_FIELDS[family])})'
    )


def _require(hf: Mapping[str, Any], field: str) -> Any:
  if hf.get(field) is None:
    raise _field_error(field, 'missing; a Llama / Qwen2 / Mistral config.json always has it')
  return hf[field]


def _rope(hf: Mapping[str, Any], max_positions: int) -> tuple[float, Optional[_config.RopeScaling]]:
  """(theta, scaling) from 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
  field = 'rope_parameters' if hf.get('rope_parameters') is not None else 'rope_scaling'
  params = dict(hf.get(field) or {})
  theta = params.pop('rope_theta', None)
  if theta is None:
    theta = hf.get('rope_theta', 10000.0)
  elif hf.get('rope_theta') not in (None, theta):
    raise _field_error(
      'rope_theta', f'{hf["rope_theta"]} disagrees with {field}.rope_theta={theta}'
    )
  rope_type = params.pop('rope_type', None) or params.pop('type', None) or 'default'
  params.pop('type', None)
  partial = params.pop('partial_rotary_factor', hf.get('partial_rotary_factor'))
  if partial not in (None, 1, 1.0):
    raise _field_error('partial_rotary_factor', f'{partial}: only full-width RoPE (1.0) works')
  if rope_type not in _ROPE_TYPES:
    raise _field_error(
      field, f'rope_type {rope_type!r} is not supported; supported: {list(_ROPE_TYPES)}'
    )
  if rope_type == 'default':
    scaling = None
  else:
    missing = [k for k in _LLAMA3_KEYS if params.get(k) is None]
    if missing:
      raise _field_error(field, f"rope_type 'llama3' needs {missing}")
    scaling = _config.RopeScaling(
      rope_type='llama3',
      factor=float(params.pop('factor')),
      low_freq_factor=float(params.pop('low_freq_factor')),
      high_freq_factor=float(params.pop('high_freq_factor')),
      original_max_len=int(params.pop('original_max_position_embeddings', None) or max_positions),
    )
  if params:
    raise _field_error(field, f'unsupported entries {sorted(params)} for rope_type {rope_type!r}')
  return float(theta), scaling


def _check_full_attention(hf: Mapping[str, Any], family: str, max_len: int) -> None:
  """Raises when a sliding window would change attention within max_len tokens."""
  n_layers = hf['num_hidden_layers']
  window = hf.get('sliding_window')
  layer_types = hf.get('layer_types')
  if layer_types is not None:
    bad = sorted({t for t in layer_types} - {'full_attention', 'sliding_attention'})
    if bad or len(layer_types) != n_layers:
      raise _field_error(
        'layer_types', f'{layer_types!r}: expected full_attention or sliding_attention per layer'
      )
    sliding = 'sliding_attention' in layer_types
  elif family == 'qwen2':
    sliding = bool(hf.get('use_sliding_window')) and hf.get('max_window_layers', 0) < n_layers
  else:
    sliding = family == 'mistral'
  if sliding and window is not None and window < max_len:
    raise _field_error(
      'sliding_window',
      f'a sliding window of {window} tokens is active for sequences up to max_len={max_len}; '
      f'sliding-window attention is not supported: load with max_len <= {window}',
    )


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> _config.DecoderConfig:
  """The DecoderConfig of a Hugging Face Llama, Qwen2 or Mistral `config.json`.

  Args:
    hf_config: the parsed `config.json` (as transformers 4.x or 5.x writes it).
    **overrides: DecoderConfig fields that do not change the parameters, e.g.
      `dtype`, `param_dtype`, `remat`, `attention_impl`, or `max_len` (default:
      the checkpoint's `max_position_embeddings`; a smaller value bounds the
      sequences and caches, and a Mistral / Qwen2 sliding window at least that
      long never slides).

  Raises:
    ValueError: an unknown `model_type` or architecture, a field curvopt does not
      know, or a setting it does not implement (other RoPE scalings, an active
      sliding window, mixture of experts, quantization, MLP biases, ...); the
      message names the field.
  """
  if not isinstance(hf_config, Mapping):
    raise TypeError(f'config_from_hf expects a dict (parsed config.json), got {hf_config!r:.80}')
  hf = dict(hf_config)
  family = _family(hf)
  _check_fields(hf, family)
  allowed = ('dtype', 'param_dtype', 'remat', 'attention_impl', 'max_len')
  bad = sorted(set(overrides) - set(allowed))
  if bad:
    raise ValueError(f'config_from_hf overrides {bad} would change the model; allowed: {allowed}')
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise _field_error('hidden_act', f'{act!r}: only SwiGLU with silu is supported')
  if hf.get('attention_dropout') not in (None, 0, 0.0):
    raise _field_error('attention_dropout', f'{hf["attention_dropout"]}: curvopt has no dropout')
  if family == 'llama' and hf.get('mlp_bias'):
    raise _field_error('mlp_bias', 'MLP biases are not supported')

  n_heads = _require(hf, 'num_attention_heads')
  d_model = _require(hf, 'hidden_size')
  max_positions = _require(hf, 'max_position_embeddings')
  max_len = overrides.pop('max_len', max_positions)
  _check_full_attention(hf, family, max_len)
  theta, scaling = _rope(hf, max_positions)
  attention_bias = bool(hf.get('attention_bias', False))
  return _config.DecoderConfig(
    vocab_size=_require(hf, 'vocab_size'),
    d_model=d_model,
    n_layers=_require(hf, 'num_hidden_layers'),
    n_heads=n_heads,
    n_kv_heads=hf.get('num_key_value_heads') or n_heads,
    d_ff=_require(hf, 'intermediate_size'),
    max_len=max_len,
    rope_theta=theta,
    # transformers' default is untied for all three families.
    tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
    norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
    head_size=hf.get('head_dim'),
    qkv_bias=family == 'qwen2' or attention_bias,
    out_bias=attention_bias,
    rope_scaling=scaling,
    **overrides,
  )


def hf_family(cfg: _config.DecoderConfig) -> str:
  """The family a DecoderConfig is written as: Qwen2 with q/k/v biases only, else Llama."""
  if cfg.out_bias and not cfg.qkv_bias:
    raise ValueError(
      'DecoderConfig with out_bias but no qkv_bias has no Hugging Face architecture '
      '(Llama biases all four projections, Qwen2 only q/k/v)'
    )
  return 'qwen2' if cfg.qkv_bias and not cfg.out_bias else 'llama'


def config_to_hf(cfg: _config.DecoderConfig, *, dtype: Optional[str] = None) -> dict[str, Any]:
  """The `config.json` of a DecoderConfig, readable by transformers 4.x and 5.x.

  RoPE settings are written the 4.x way (`rope_theta`, `rope_scaling`), which 5.x also reads.
  """
  family = hf_family(cfg)
  hf: dict[str, Any] = {
    'architectures': [_ARCHITECTURES[family]],
    'model_type': family,
    'vocab_size': cfg.vocab_size,
    'hidden_size': cfg.d_model,
    'intermediate_size': cfg.d_ff,
    'num_hidden_layers': cfg.n_layers,
    'num_attention_heads': cfg.n_heads,
    'num_key_value_heads': cfg.n_kv_heads,
    'head_dim': cfg.head_dim,
    'hidden_act': 'silu',
    'max_position_embeddings': cfg.max_len,
    'rms_norm_eps': cfg.norm_eps,
    'rope_theta': cfg.rope_theta,
    'rope_scaling': None,
    'tie_word_embeddings': cfg.tie_embeddings,
    'attention_dropout': 0.0,
    'torch_dtype': dtype or cfg.param_dtype,
  }
  if family == 'llama':
    hf.update(attention_bias=cfg.out_bias, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    hf['rope_scaling'] = {
      'rope_type': s.rope_type,
      'factor': s.factor,
      'low_freq_factor': s.low_freq_factor,
      'high_freq_factor': s.high_freq_factor,
      'original_max_position_embeddings': s.original_max_len,
    }
  return hf
