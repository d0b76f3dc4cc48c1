"""A Hugging Face Trainer checkpoint's optimizer.pt, read as named second moments."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from curvopt import merge

torch = pytest.importorskip('torch')


class _Tiny(torch.nn.Module):
  """Linear layers with biases and a LayerNorm: both Trainer groups, and
  two weights of one shape (their moments must not be swapped)."""

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(7, 4)
    self.q = torch.nn.Linear(4, 4)
    self.o = torch.nn.Linear(4, 4)
    self.norm = torch.nn.LayerNorm(4)
    self.head = torch.nn.Linear(4, 3, bias=False)

  def forward(self, ids):
    x = self.embed(ids)
    return self.head(self.norm(self.o(torch.tanh(self.q(x))))).sum()


def _trainer_checkpoint(directory):
  """Trains a few AdamW steps with the Trainer's two groups and saves its
  optimizer.pt; returns (names in index order, {name: exp_avg_sq})."""
  torch.manual_seed(0)
  model = _Tiny()
  named = list(model.named_parameters())
  decay = [n for n, _ in named if not n.endswith('bias') and not n.startswith('norm')]
  groups = [
    {'params': [p for n, p in named if n in decay], 'weight_decay': 0.1},
    {'params': [p for n, p in named if n not in decay], 'weight_decay': 0.0},
  ]
  optimizer = torch.optim.AdamW(groups, lr=1e-2)
  for step in range(3):
    optimizer.zero_grad()
    model(torch.tensor([step, 3, 5])).backward()
    optimizer.step()
  directory.mkdir()
  torch.save(optimizer.state_dict(), directory / 'optimizer.pt')
  order = decay + [n for n, _ in named if n not in decay]
  params = dict(named)
  want = {n: optimizer.state[params[n]]['exp_avg_sq'].numpy().copy() for n in order}
  return order, want


def test_reads_exp_avg_sq_by_parameter_name(tmp_path):
  order, want = _trainer_checkpoint(tmp_path / 'checkpoint-3')
  decay = [n for n in order if n in ('embed.weight', 'q.weight', 'o.weight', 'head.weight')]
  rest = [n for n in order if n not in decay]
  for names in (order, [decay, rest]):
    reader = merge.trainer_moments_reader(str(tmp_path / 'checkpoint-3'), names=names)
    assert set(reader.names) == set(order)
    got = reader.read(order)
    for name in order:
      assert got[name].dtype == np.float32
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert reader.steps['q.weight'] == 3
  names_file = tmp_path / 'names.txt'
  names_file.write_text('\n'.join(order))
  reader = merge.trainer_moments_reader(
    str(tmp_path / 'checkpoint-3' / 'optimizer.pt'), names=str(names_file)
  )
  np.testing.assert_array_equal(reader.read(['o.weight'])['o.weight'], want['o.weight'])


def test_names_that_do_not_fit_the_groups(tmp_path):
  order, _ = _trainer_checkpoint(tmp_path / 'ckpt')
  with pytest.raises(ValueError, match=r'7 parameter names for the 8 .*groups of \[4, 4\]'):
    merge.trainer_moments_reader(str(tmp_path / 'ckpt'), names=order[:-1])
  with pytest.raises(ValueError, match='no optimizer state'):
    merge.trainer_moments_reader(str(tmp_path))


def test_missing_torch_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ValueError, match=r'curvopt\[torch\]'):
    merge.trainer_moments_reader(str(tmp_path))


def _llama(transformers, seed):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
  )
  return transformers.LlamaForCausalLM(config)


def _tokenizer(transformers):
  tokenizers = pytest.importorskip('tokenizers')
  vocab = {f't{i}': i for i in range(64)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='t0'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='t0')


def test_hf_trainer_checkpoints_merge_with_ota_and_load_in_transformers(tmp_path):
  """Experts fine-tuned by transformers.Trainer's optimizer (its own two groups), saved as a
  Trainer checkpoint; OTA reads their optimizer.pt through the parameter order rebuilt from
  config.json, and transformers loads the merged directory."""
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('accelerate')  # transformers.Trainer needs it
  base = _llama(transformers, 0)
  base.save_pretrained(tmp_path / 'base')
  _tokenizer(transformers).save_pretrained(tmp_path / 'base')
  experts, moments = [], []
  for t in range(2):
    model = _llama(transformers, 0)
    args = transformers.TrainingArguments(
      output_dir=str(tmp_path / 'runs'), report_to=[], use_cpu=True
    )
    optimizer = transformers.Trainer(model=model, args=args).create_optimizer()
    for step in range(2):
      ids = torch.tensor([[1 + t, 2 + step, 3, 4, 5]])
      model(input_ids=ids, labels=ids).loss.backward()
      optimizer.step()
      optimizer.zero_grad()
    checkpoint = tmp_path / f'e{t}' / 'checkpoint-2'
    model.save_pretrained(checkpoint)
    torch.save(optimizer.state_dict(), checkpoint / 'optimizer.pt')
    named = dict(model.named_parameters())
    experts.append({n: p.detach().numpy().copy() for n, p in named.items()})
    moments.append({n: optimizer.state[p]['exp_avg_sq'].numpy().copy() for n, p in named.items()})
  spec = {
    'method': 'ota',
    'base': {'path': str(tmp_path / 'base')},
    'experts': [{'path': str(tmp_path / f'e{t}' / 'checkpoint-2')} for t in range(2)],
    'options': {'eps': 1e-26},
  }
  out = tmp_path / 'merged'
  merge.merge_from_spec(spec, str(out))
  record = (out / 'merge_spec.json').read_text()
  assert '"format": "trainer"' in record
  base_params = {n: p.detach().numpy() for n, p in base.named_parameters()}
  want = merge.ota(
    {n: jnp.asarray(v) for n, v in base_params.items()},
    [{n: jnp.asarray(v) for n, v in e.items()} for e in experts],
    moments,
    eps=1e-26,
  )
  got = merge.SafetensorsReader(str(out)).read(list(base_params))
  for name in base_params:
    np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  np.testing.assert_array_equal(
    loaded.model.embed_tokens.weight.detach().numpy(), got['model.embed_tokens.weight']
  )
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizer('t3 t5')['input_ids'] == [3, 5]
