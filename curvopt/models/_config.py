"""Decoder hyper-parameters and the named presets (tiny / small / gpt2s)."""

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

_ATTENTION_IMPLS = (None, 'xla', 'cudnn')
ROPE_SCALING_TYPES = ('llama3',)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3's RoPE frequency scaling (as Llama 3.1 / 3.2 checkpoints use it).

  Wavelengths shorter than ``original_max_len / high_freq_factor`` keep their
  frequency, those longer than ``original_max_len / low_freq_factor`` are
  divided by ``factor``, and the band between is interpolated smoothly.

  Attributes:
    rope_type: 'llama3' (the only scaling curvopt implements).
    factor: frequency divisor of the long wavelengths.
    low_freq_factor: sets the long-wavelength edge of the band.
    high_freq_factor: sets the short-wavelength edge (> low_freq_factor).
    original_max_len: the context length the model was pretrained at.
  """

  rope_type: str
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_len: int

  def __post_init__(self):
    if self.rope_type not in ROPE_SCALING_TYPES:
      raise ValueError(
        f'RopeScaling.rope_type must be one of {ROPE_SCALING_TYPES}, got {self.rope_type!r}'
      )
    for name in ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_len'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'RopeScaling.{name} must be a number, got {value!r}')
      if not value > 0:
        raise ValueError(f'RopeScaling.{name} must be positive, got {value}')
    if not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(
        f'RopeScaling.high_freq_factor={self.high_freq_factor} must exceed '
        f'low_freq_factor={self.low_freq_factor}'
      )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shapes and numerics of the LLaMA-style decoder.

  Attributes:
    vocab_size: number of token ids (rows of the embedding).
    d_model: width of the residual stream.
    n_layers: number of transformer blocks (``layers_0 ... layers_{n-1}``).
    n_heads: query heads; ``d_model`` must be a multiple of it unless
      ``head_size`` is given, and the head dimension must be even (RoPE
      rotates pairs).
    n_kv_heads: key/value heads; ``n_heads`` must be a multiple of it (grouped
      query attention when smaller than ``n_heads``).
    d_ff: hidden width of the SwiGLU MLP.
    max_len: longest sequence (and KV cache) the model accepts.
    rope_theta: RoPE base frequency.
    tie_embeddings: output head is the transposed token embedding when True,
      a separate ``head/kernel`` [d_model, vocab_size] otherwise.
    norm_eps: epsilon of the RMS norms.
    dtype: compute dtype name (activations, KV cache); logits are always
      float32.
    param_dtype: dtype the parameters are created and stored in.
    remat: rematerialize every block on the backward pass (saves memory on big
      models; ignored when decoding, which has no backward pass).
    attention_impl: ``implementation`` passed to
      ``jax.nn.dot_product_attention`` for the unmasked causal forward
      (None lets JAX choose, 'xla', or 'cudnn' for cuDNN flash attention on
      GPUs with bf16/fp16 compute). Masked and decoding calls always use XLA.
    head_size: width of each attention head when it is not
      ``d_model // n_heads`` (Hugging Face's explicit ``head_dim``); None
      derives it. A value equal to the derived one is stored as None, so
      equal models have equal configs. Read the width as ``head_dim``.
    qkv_bias: the q, k and v projections have a ``bias`` (Qwen2).
    out_bias: the attention output projection has a ``bias`` (Llama's
      ``attention_bias`` sets both).
    rope_scaling: RoPE frequency scaling (``RopeScaling``), None for plain
      RoPE.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  max_len: int
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: bool = False
  attention_impl: Optional[str] = None
  head_size: Optional[int] = None
  qkv_bias: bool = False
  out_bias: bool = False
  rope_scaling: Optional[RopeScaling] = None

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'max_len'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'DecoderConfig.{name} must be an int, got {value!r}')
      if value <= 0:
        raise ValueError(f'DecoderConfig.{name} must be positive, got {value}')
    for name in ('rope_theta', 'norm_eps'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'DecoderConfig.{name} must be a number, got {value!r}')
      if not value > 0:
        raise ValueError(f'DecoderConfig.{name} must be positive, got {value}')
    for name in ('tie_embeddings', 'remat', 'qkv_bias', 'out_bias'):
      value = getattr(self, name)
      if not isinstance(value, bool):
        raise TypeError(f'DecoderConfig.{name} must be a bool, got {value!r}')
    if self.head_size is not None:
      if isinstance(self.head_size, bool) or not isinstance(self.head_size, int):
        raise TypeError(f'DecoderConfig.head_size must be an int or None, got {self.head_size!r}')
      if self.head_size <= 0:
        raise ValueError(f'DecoderConfig.head_size must be positive, got {self.head_size}')
      if self.head_size * self.n_heads == self.d_model:
        object.__setattr__(self, 'head_size', None)
    if self.head_size is None and self.d_model % self.n_heads:
      raise ValueError(
        f'DecoderConfig.d_model={self.d_model} is not a multiple of n_heads={self.n_heads}'
      )
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f'DecoderConfig.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}'
      )
    if self.head_dim % 2:
      raise ValueError(
        f'DecoderConfig head dimension {self.head_dim} (d_model={self.d_model}, '
        f'n_heads={self.n_heads}, head_size={self.head_size}) must be even for RoPE'
      )
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise TypeError(
        f'DecoderConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}'
      )
    # Stored as canonical names so that the config stays hashable and prints
    # the same whichever spelling ('bf16' is not one; jnp.bfloat16 is) came in.
    for name in ('dtype', 'param_dtype'):
      object.__setattr__(self, name, _float_dtype_name(name, getattr(self, name)))
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(
        f'DecoderConfig.attention_impl must be one of {_ATTENTION_IMPLS}, '
        f'got {self.attention_impl!r}'
      )

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads if self.head_size is None else self.head_size

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)


def _float_dtype_name(field: str, value: Any) -> str:
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f'DecoderConfig.{field} is not a dtype: {value!r}') from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'DecoderConfig.{field} must be a floating dtype, got {value!r}')
  return dtype.name


# Vocab 384: the byte tokenizer's ~260 ids padded to a multiple of 128.
# gpt2s: GPT-2 small shapes; d_ff 2048 gives the SwiGLU MLP (3 matrices) the
# parameter count of GPT-2's 4 * d_model two-matrix MLP, ~124M in total.
_PRESETS = {
  'tiny': dict(
    vocab_size=384, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=384, max_len=512
  ),
  'small': dict(
    vocab_size=384, d_model=256, n_layers=12, n_heads=8, n_kv_heads=8, d_ff=768, max_len=1024
  ),
  'gpt2s': dict(
    vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, max_len=1024
  ),
}

PRESET_NAMES = tuple(_PRESETS)


def model_config(name: str, **overrides: Any) -> DecoderConfig:
  """Returns the preset ``name`` ('tiny', 'small', 'gpt2s') with overrides.

  Args:
    name: preset name.
    **overrides: any ``DecoderConfig`` field. The presets use full multi-head
      attention, so overriding ``n_heads`` alone also sets ``n_kv_heads`` to it.

  Raises:
    ValueError: unknown preset name or field, or an invalid resulting config.
  """
  if name not in _PRESETS:
    raise ValueError(f'unknown model config {name!r}; valid names: {list(PRESET_NAMES)}')
  fields = {f.name for f in dataclasses.fields(DecoderConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
      f'unknown DecoderConfig field(s) {unknown} for model config {name!r}; '
      f'valid fields: {sorted(fields)}'
    )
  kwargs = dict(_PRESETS[name])
  if 'n_heads' in overrides and 'n_kv_heads' not in overrides:
    kwargs['n_kv_heads'] = overrides['n_heads']
  kwargs.update(overrides)
  return DecoderConfig(**kwargs)
