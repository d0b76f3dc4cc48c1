"""A Hugging Face Trainer checkpoint's optimizer.pt, read as named second moments."""

import sys

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
