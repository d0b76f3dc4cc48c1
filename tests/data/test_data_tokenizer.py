"""ByteTokenizer: ids, round trips, specials, invalid UTF-8, bad input."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from curvopt.data import ByteTokenizer

_TEXTS = {
  'empty': '',
  'ascii': 'def f(x):\n\treturn x + 1  # ok\n',
  'nul_and_controls': '\x00\x01\x7f\r\n',
  'non_ascii': 'héllo wörld ✓ 日本語 🙂',
}


def test_special_ids_and_vocab():
  tok = ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (256, 257, 258, 259)
  assert tok.vocab_size % 8 == 0 and tok.vocab_size > tok.sep_id
  specials = tok.special_ids
  assert sorted(specials.values()) == list(range(256, tok.vocab_size))
  assert specials['<eos>'] == tok.eos_id


@pytest.mark.parametrize('text', list(_TEXTS.values()), ids=list(_TEXTS))
def test_round_trip_matches_utf8_bytes(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == list(text.encode('utf-8'))
  assert tok.decode(ids) == text
  assert tok.decode(ids.tolist()) == text


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
  tok = ByteTokenizer()
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_bos_eos_and_specials_skipped_or_named():
  tok = ByteTokenizer()
  ids = tok.encode('ab', add_bos=True, add_eos=True)
  assert ids.tolist() == [tok.bos_id, 97, 98, tok.eos_id]
  assert tok.decode(ids) == 'ab'
  assert tok.decode(ids, skip_special=False) == '<bos>ab<eos>'
  assert tok.encode('ab', add_eos=True).tolist() == [97, 98, tok.eos_id]
  with_pad = [97, tok.pad_id, tok.pad_id, 98, tok.sep_id]
  assert tok.decode(with_pad) == 'ab'
  assert tok.decode(with_pad, skip_special=False) == 'a<pad><pad>b<sep>'


@pytest.mark.parametrize(
  'ids, skip_special, expected',
  [
    ([0xFF, 0xFE, 104, 105], True, '\ufffd\ufffdhi'),
    ([104, 0xC3], True, 'h\ufffd'),  # truncated 2-byte character
    ([0xE2, 0x9C], True, '\ufffd'),  # truncated 3-byte character
    ([0xC3, 258, 0xA9], False, '\ufffd<eos>\ufffd'),  # a special splits a character
    ([0xED, 0xA0, 0x80], True, '\ufffd\ufffd\ufffd'),  # an encoded surrogate
  ],
)
def test_invalid_utf8_is_replaced_not_raised(ids, skip_special, expected):
  assert ByteTokenizer().decode(np.array(ids), skip_special=skip_special) == expected


def test_lone_surrogate_encodes_and_decodes_without_raising():
  tok = ByteTokenizer()
  ids = tok.encode('a\ud800b')
  assert tok.decode(ids) == 'a\ufffd\ufffd\ufffdb'


@pytest.mark.parametrize(
  'bad_ids, match',
  [
    ([1, 264], '264'),
    ([-1], '-1'),
    ([[1, 2]], 'shape'),
  ],
)
def test_decode_rejects_bad_ids(bad_ids, match):
  with pytest.raises(ValueError, match=match):
    ByteTokenizer().decode(bad_ids)


def test_decode_rejects_float_ids_and_encode_rejects_bytes():
  tok = ByteTokenizer()
  with pytest.raises(TypeError, match='float'):
    tok.decode(np.array([1.0, 2.0]))
  with pytest.raises(TypeError, match='bytes'):
    tok.encode(b'abc')
