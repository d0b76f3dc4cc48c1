"""HFTokenizer: ids equal to `tokenizers`' own (golden ids from tests/fixtures/hf), special
tokens, chat templates as transformers renders them, the shared Tokenizer interface with the
batch builders, and bad input."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from curvopt import data

pytest.importorskip('tokenizers')

TOKENIZER = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'fixtures', 'hf', 'tokenizer'
)
with open(os.path.join(TOKENIZER, 'golden.json')) as _f:
  GOLDEN = json.load(_f)
PAD, BOS, EOS, IM_START, IM_END = range(5)  # the fixture's special ids


@pytest.fixture(scope='module')
def tok():
  return data.HFTokenizer(TOKENIZER)


def _copy(tmp_path):
  out = tmp_path / 'tokenizer'
  shutil.copytree(TOKENIZER, out)
  return out


def _edit_config(path, **changes):
  file = os.path.join(path, 'tokenizer_config.json')
  with open(file) as f:
    config = json.load(f)
  config.update(changes)
  for key, value in changes.items():
    if value is None:
      del config[key]
  with open(file, 'w') as f:
    json.dump(config, f)


def test_ids_equal_the_tokenizers_library(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS)
  assert tok.vocab_size == GOLDEN['vocab_size']
  for text, ids, with_bos, decoded in zip(
    GOLDEN['texts'], GOLDEN['ids'], GOLDEN['ids_with_specials'], GOLDEN['decoded']
  ):
    encoded = tok.encode(text)
    assert encoded.dtype == np.int32 and encoded.tolist() == ids, text
    # The tokenizer's post-processor adds BOS; encode adds it when asked.
    assert tok.encode(text, add_bos=True).tolist() == with_bos
    assert tok.encode(text, add_eos=True).tolist() == ids + [EOS]
    assert tok.encode_prompt(text).tolist() == with_bos
    assert tok.decode(encoded) == decoded
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == decoded


def test_specials_in_text_and_in_decoding(tok):
  ids = tok.encode('a <|im_end|> b', add_eos=True)
  assert IM_END in ids.tolist() and ids[-1] == EOS
  assert '<|' not in tok.decode(ids)  # specials skipped
  assert '<|im_end|>' in tok.decode(ids, skip_special=False)
  assert tok.decode(ids, skip_special=False).endswith('<|end|>')


def test_chat_template_prompts_equal_transformers(tok):
  chat = data.HFTokenizer(TOKENIZER, chat_template=True)
  assert chat.has_chat_template and not tok.has_chat_template
  for prompt, ids in zip(GOLDEN['chat_prompts'], GOLDEN['chat_ids']):
    assert chat.encode_prompt(prompt).tolist() == ids
  text = chat.apply_chat_template([{'role': 'user', 'content': 'hi'}])
  assert text == '<|begin|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  system = data.HFTokenizer(TOKENIZER, chat_template=True, system_prompt='Be brief.')
  expected = (
    '<|begin|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
    '<|im_start|>assistant\n'
  )
  assert system.encode_prompt('hi').tolist() == tok.encode(expected).tolist()
  own = data.HFTokenizer(TOKENIZER, chat_template='Q: {{ messages[-1].content }}\nA:')
  assert own.encode_prompt('x').tolist() == tok.encode('Q: x\nA:').tolist()


def test_transformers_4_layout_reads_alike(tmp_path):
  """AddedToken dicts and the template inside tokenizer_config.json, as 4.x writes them."""
  path = _copy(tmp_path)
  with open(path / 'chat_template.jinja') as f:
    template = f.read()
  os.remove(path / 'chat_template.jinja')
  _edit_config(
    path,
    chat_template=template,
    bos_token={'__type': 'AddedToken', 'content': '<|begin|>', 'special': True},
    eos_token={'__type': 'AddedToken', 'content': '<|end|>', 'special': True},
  )
  old = data.HFTokenizer(path, chat_template=True)
  assert (old.bos_id, old.eos_id, old.pad_id) == (BOS, EOS, PAD)
  assert old.encode_prompt(GOLDEN['chat_prompts'][0]).tolist() == GOLDEN['chat_ids'][0]
  assert data.HFTokenizer(path / 'tokenizer.json').eos_id == EOS


def test_missing_bos_and_pad_fall_back(tmp_path):
  path = _copy(tmp_path)
  _edit_config(path, bos_token=None, pad_token=None)
  tok = data.HFTokenizer(path)
  assert tok.bos_id is None and tok.pad_id == tok.eos_id == EOS
  assert tok.encode('ab', add_bos=True).tolist() == tok.encode('ab').tolist()
  assert data.HFTokenizer(path, eos_token='<|im_end|>', pad_token='<|pad|>').eos_id == IM_END


def test_one_interface_for_both_tokenizers(tok):
  for t in (tok, data.ByteTokenizer()):
    assert isinstance(t, data.Tokenizer)
  byte = data.ByteTokenizer()
  assert byte.encode_prompt('ab').tolist() == [byte.bos_id, 97, 98]


def test_task_batches_and_prompt_batch_with_a_chat_template():
  chat = data.HFTokenizer(TOKENIZER, chat_template=True)
  example = {'prompt': 'What is 2 + 2?', 'completion': 'It is 4.\n#### 4', 'answer': '4'}
  batch = next(data.TaskBatches({'t': [example]}, chat, batch_size=2, seq_len=48, seed=0))
  prompt = chat.encode_prompt(example['prompt'])
  row = np.concatenate([prompt, chat.encode(example['completion'], add_eos=True)])
  for r in range(2):
    np.testing.assert_array_equal(batch['tokens'][r, : len(row)], row)
    assert (batch['tokens'][r, len(row) :] == chat.pad_id).all()
    assert batch['prompt_mask'][r].sum() == len(prompt)
    targets = batch['tokens'][r][batch['loss_mask'][r] == 1]
    assert chat.decode(targets) == chat.decode(chat.encode(example['completion']))
    assert targets[-1] == EOS
  prompts, mask = data.prompt_batch([example, 'hi'], chat, max_prompt_len=40)
  np.testing.assert_array_equal(prompts[0][mask[0] == 1], prompt)
  assert (prompts[mask == 0] == chat.pad_id).all()


# (how to spoil a copy of the fixture, HFTokenizer keywords, exception, message fragment)
BAD = {
  'no_tokenizer_json': (
    lambda p: os.remove(p / 'tokenizer.json'),
    {},
    ValueError,
    'tokenizer.json',
  ),
  'no_template': (
    lambda p: os.remove(p / 'chat_template.jinja'),
    dict(chat_template=True),
    ValueError,
    'no chat template',
  ),
  'unknown_eos': (lambda p: None, dict(eos_token='</s>'), ValueError, "eos_token '</s>'"),
  'no_eos': (lambda p: _edit_config(p, eos_token=None), {}, ValueError, 'eos_token'),
  'system_without_template': (
    lambda p: None,
    dict(system_prompt='x'),
    ValueError,
    'system_prompt needs a chat_template',
  ),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_raises_clearly(case, tmp_path):
  spoil, kwargs, exc, fragment = BAD[case]
  path = _copy(tmp_path)
  spoil(path)
  with pytest.raises(exc, match=fragment):
    data.HFTokenizer(path, **kwargs)


def test_bad_ids_and_text(tok):
  with pytest.raises(ValueError, match=r'ids outside \[0, 126\): \[126\]'):
    tok.decode([1, 126])
  with pytest.raises(ValueError, match='1-D'):
    tok.decode([[1]])
  with pytest.raises(TypeError, match='expects a str'):
    tok.encode(b'bytes')


def test_missing_library_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tokenizers', None)
  with pytest.raises(ImportError, match=r"'tokenizers'.*pip install 'curvopt\[hf\]'"):
    data.HFTokenizer(TOKENIZER)


def test_transformers_gives_the_same_ids(tok):
  transformers = pytest.importorskip('transformers')
  reference = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
  for text in GOLDEN['texts']:
    assert tok.encode(text, add_bos=True).tolist() == reference(text)['input_ids']
  chat = data.HFTokenizer(TOKENIZER, chat_template=True)
  messages = [{'role': 'user', 'content': 'reverse: abc'}]
  expected = reference.apply_chat_template(messages, add_generation_prompt=True)
  expected = expected['input_ids'] if hasattr(expected, 'keys') else expected
  assert chat.encode_prompt('reverse: abc').tolist() == list(expected)
