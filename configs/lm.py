r"""Language-model pretraining on the code corpus.

Launch (tiny runs in minutes on 2 CPU cores):
  python experiments/train_lm.py --config=configs/lm.py:tiny --workdir=/tmp/lm_tiny
  python experiments/train_lm.py --config=configs/lm.py:tiny --workdir=/tmp/lm \
      --config.total_steps=200 --config.optimizer.name=optax_muon
Variants: tiny (CPU), small (CPU, ~10M params), gpt2s (GPU, ~124M params, bf16 compute);
tiny_untied and small_untied: the same with a separate output head (the embedding / head group
then has two members, as in the LLaMA models of the LANTON paper).
"""

import ml_collections
from ml_collections import config_dict

# variant -> (model size, batch size, sequence length, total steps, eval batches)
_VARIANTS = {
  'tiny': ('tiny', 16, 128, 300, 16),
  'small': ('small', 32, 256, 2000, 16),
  'gpt2s': ('gpt2s', 64, 1024, 5000, 16),
}
_UNTIED = {'tiny_untied': 'tiny', 'small_untied': 'small'}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  if arg not in _VARIANTS and arg not in _UNTIED:
    raise ValueError(
      f'unknown configs/lm.py variant {arg!r}; valid: {sorted(_VARIANTS) + sorted(_UNTIED)}'
    )
  model_name, batch_size, seq_len, total_steps, eval_batches = _VARIANTS[_UNTIED.get(arg, arg)]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = total_steps
  config.halt_after_steps = 0  # > 0: stop cleanly after this step, with a checkpoint
  config.log_every = 25
  config.eval_every = 100
  config.tensorboard = True

  config.model = ml_collections.ConfigDict()
  config.model.name = model_name
  config.model.dtype = 'auto'  # bf16 compute on accelerators, fp32 on the CPU
  # Overrides of the named size; None keeps the size's own value.
  for field in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'vocab_size', 'max_len'):
    config.model[field] = config_dict.placeholder(int)
  config.model.tie_embeddings = config_dict.placeholder(bool)
  if arg in _UNTIED:
    config.model.tie_embeddings = False
  config.model.remat = config_dict.placeholder(bool)
  # 'hf:/path': start from a Hugging Face Llama / Qwen2 / Mistral directory (its config.json
  # sets the model, leaving config.model its dtype, remat and max_len; its tokenizer.json
  # replaces the byte tokenizer). None: from scratch.
  config.init_from = config_dict.placeholder(str)

  config.data = ml_collections.ConfigDict()
  config.data.name = 'code_corpus'  # or any tfds name whose files exist under data_dir (lm1b, c4)
  config.data.eval_split = 'validation'
  config.data.data_dir = config_dict.placeholder(str)  # default: $TFDS_DATA_DIR or <workdir>/tfds
  config.data.batch_size = batch_size
  config.data.seq_len = seq_len
  config.data.eval_batches = eval_batches

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'  # or optax_muon, dmuon, dmuon_noise, lanton, lanton_mean
  config.optimizer.learning_rate = 3e-3
  config.optimizer.adam_learning_rate = config_dict.placeholder(float)  # muon's Adam leaves
  config.optimizer.weight_decay = 0.1
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.momentum = 0.95
  config.optimizer.consistent_rms = config_dict.placeholder(float)  # optax_muon only
  config.optimizer.lanton_mapping = 'mean_ratio'  # or 'min_ratio', 'ones' (no adaptation)
  config.optimizer.lanton_nesterov = config_dict.placeholder(bool)  # None: False
  # The sign LMO moves every embedding / head entry by the full step: a smaller share of the
  # schedule keeps it in line with the hidden matrices' spectral steps (1.0: the full schedule,
  # optim.lanton's own default). 0.1 is the share every LANTON run of docs/lm_experiments.md used.
  config.optimizer.lanton_embed_head_scale = 0.1
  # The noise estimate's second Newton-Schulz is LANTON's main cost: refresh it every k steps
  # and / or with fewer iterations (None: every step, the update's own ns_steps).
  config.optimizer.lanton_noise_every = config_dict.placeholder(int)
  config.optimizer.lanton_noise_ns_steps = config_dict.placeholder(int)
  # Norm scales and other vector leaves: 'adamw' (None) or 'bias_rms', LANTON's bias-RMS LMO,
  # at lanton_vector_scale of the schedule (None: 1; only with 'bias_rms').
  config.optimizer.lanton_vector = config_dict.placeholder(str)
  config.optimizer.lanton_vector_scale = config_dict.placeholder(float)
  # Noise adaptation of dmuon_noise (D-Muon times optim.noise_adaptive's factors); lanton and
  # lanton_mean read the options too (their mapping is lanton_mapping's). dmuon_noise with every
  # field None: mean_ratio, p = 1/4, geometric mean (optim.noise_adaptive's default, the best
  # recipe of docs/lm_experiments.md); a named mapping starts from its own defaults.
  config.optimizer.noise_mapping = config_dict.placeholder(str)  # 'mean_ratio', 'min_ratio', 'ones'
  config.optimizer.noise_exponent = config_dict.placeholder(float)  # the ratio's power p
  config.optimizer.noise_normaliser = config_dict.placeholder(str)  # 'arithmetic', 'geometric'
  config.optimizer.noise_s_min = config_dict.placeholder(float)  # mean_ratio's clip; None: 0.1
  config.optimizer.noise_s_max = config_dict.placeholder(float)  # None: 3.0
  # True: the scale-free variant, noise relative to the momentum's squared dual norm (None: False)
  config.optimizer.noise_relative = config_dict.placeholder(bool)
  config.optimizer.grad_clip_norm = 1.0

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'warmup_cosine'  # or 'wsd', 'constant'
  config.schedule.warmup_steps = max(10, total_steps // 20)
  config.schedule.final_fraction = 0.1
  config.schedule.decay_fraction = 0.2  # wsd only

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = max(50, total_steps // 10)
  config.checkpoint.keep = 3
  config.checkpoint.async_save = True

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.num_devices = config_dict.placeholder(int)  # None: every visible device
  return config
