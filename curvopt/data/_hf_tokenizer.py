"""A Hugging Face `tokenizer.json` behind the Tokenizer interface (through `tokenizers`).

The special tokens and the chat template come from the files `save_pretrained` writes next to
it: `tokenizer_config.json` (and 4.x's `special_tokens_map.json`), and 5.x's
`chat_template.jinja`. `tokenizers` and `jinja2` are the optional `[hf]` extra, imported when a
tokenizer is made.
"""

from collections.abc import Mapping, Sequence
import datetime
import importlib
import json
import os
from typing import Any, Optional, Union

import numpy as np

from curvopt.data import _tokenizer

_INSTALL = "pip install 'curvopt[hf]'"


def _import(name: str, why: str):
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise ImportError(f'{why} needs the {name!r} package, not installed here: {_INSTALL}') from e


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_text(value: Any) -> Optional[str]:
  # 4.x writes special tokens as AddedToken dicts, 5.x as plain strings.
  if isinstance(value, Mapping):
    value = value.get('content')
  return value if isinstance(value, str) else None


def _compile_template(source: str):
  """The template as transformers compiles it (sandboxed, trimmed blocks, its globals)."""
  jinja2 = _import('jinja2', 'a chat template')
  from jinja2 import ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  env = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols]
  )
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


class HFTokenizer:
  """A Hugging Face tokenizer directory (or `tokenizer.json`) as a curvopt Tokenizer.

  `encode` gives the ids `tokenizers` gives without its post-processor, and adds BOS / EOS
  itself when asked; a tokenizer without a BOS token (Qwen2) adds none. PAD falls back to EOS
  when the tokenizer names no pad token (Llama 3): padding is masked everywhere it occurs, but
  train_lm's loss then skips EOS targets too.
  """

  def __init__(
    self,
    path: Union[str, os.PathLike],
    *,
    chat_template: Union[bool, str] = False,
    system_prompt: Optional[str] = None,
    bos_token: Optional[str] = None,
    eos_token: Optional[str] = None,
    pad_token: Optional[str] = None,
  ):
    """Reads the tokenizer and its special tokens.

    Args:
      path: a directory holding `tokenizer.json` (and usually `tokenizer_config.json`),
        or the `tokenizer.json` file.
      chat_template: False: prompts are BOS + text. True: prompts are a user turn in the
        tokenizer's chat template, ready for the assistant's answer. A str: that template.
      system_prompt: a system turn before each prompt (with a chat template only).
      bos_token, eos_token, pad_token: override the tokenizer config's special tokens
        (e.g. eos_token='<|im_end|>' to stop at the end of a chat turn).

    Raises:
      ImportError: `tokenizers` (or, for a chat template, `jinja2`) is not installed.
      ValueError: no tokenizer.json, no EOS token, a named special token missing from the
        vocabulary, or chat_template=True without a template.
    """
    tokenizers = _import('tokenizers', 'HFTokenizer')
    path = os.fspath(path)
    folder = os.path.dirname(path) if path.endswith('.json') else path
    file = path if path.endswith('.json') else os.path.join(path, 'tokenizer.json')
    if not os.path.exists(file):
      found = sorted(os.listdir(folder)) if os.path.isdir(folder) else 'no such directory'
      raise ValueError(f'{file} does not exist (found {found}); HFTokenizer reads tokenizer.json')
    self.path = folder
    self._tok = tokenizers.Tokenizer.from_file(file)
    config = {
      **_read_json(os.path.join(folder, 'special_tokens_map.json')),
      **_read_json(os.path.join(folder, 'tokenizer_config.json')),
    }
    self._special_tokens = {
      name: _token_text(config.get(name))
      for name in ('bos_token', 'eos_token', 'pad_token', 'unk_token')
    }
    overrides = {'bos_token': bos_token, 'eos_token': eos_token, 'pad_token': pad_token}
    self._special_tokens.update({k: v for k, v in overrides.items() if v is not None})
    self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self._bos_id = self._id_of('bos_token')
    self._eos_id = self._id_of('eos_token')
    if self._eos_id is None:
      raise ValueError(f'{folder} names no eos_token in tokenizer_config.json; pass eos_token=')
    pad_id = self._id_of('pad_token')
    self._pad_id = self._eos_id if pad_id is None else pad_id
    self._template = None
    self._system_prompt = system_prompt
    if chat_template is not False:
      source = chat_template if isinstance(chat_template, str) else self._stored_template(config)
      self._template = _compile_template(source)
    elif system_prompt is not None:
      raise ValueError('HFTokenizer system_prompt needs a chat_template')

  def _id_of(self, name: str) -> Optional[int]:
    token = self._special_tokens[name]
    if token is None:
      return None
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise ValueError(f'{name} {token!r} is not in the vocabulary of {self.path}')
    return token_id

  def _stored_template(self, config: Mapping[str, Any]) -> str:
    jinja_file = os.path.join(self.path, 'chat_template.jinja')
    if os.path.exists(jinja_file):
      with open(jinja_file) as f:
        return f.read()
    template = config.get('chat_template')
    if isinstance(template, list):  # named templates: the default one
      template = {t.get('name'): t.get('template') for t in template}.get('default')
    if not isinstance(template, str):
      raise ValueError(
        f'{self.path} has no chat template (chat_template.jinja or tokenizer_config.json '
        "'chat_template'); pass chat_template=False or a template string"
      )
    return template

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> Optional[int]:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def has_chat_template(self) -> bool:
    return self._template is not None

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """int32 ids of `text` (special-token text in it maps to the special ids)."""
    if not isinstance(text, str):
      raise TypeError(f'encode expects a str, got {type(text).__name__}: {text!r:.80}')
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_bos and self._bos_id is not None:
      ids = [self._bos_id, *ids]
    if add_eos:
      ids = [*ids, self._eos_id]
    return np.asarray(ids, np.int32)

  def apply_chat_template(
    self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
  ) -> str:
    """The text of `messages` ([{'role': ..., 'content': ...}]) in the chat template."""
    if self._template is None:
      raise ValueError('this HFTokenizer was made without a chat_template')
    special = {k: v for k, v in self._special_tokens.items() if v is not None}
    return self._template.render(
      messages=list(messages), add_generation_prompt=add_generation_prompt, **special
    )

  def encode_prompt(self, text: str) -> np.ndarray:
    """BOS + text, or with a chat template: a user turn of `text` and the assistant's header."""
    if self._template is None:
      return self.encode(text, add_bos=True)
    if not isinstance(text, str):
      raise TypeError(f'encode_prompt expects a str, got {type(text).__name__}: {text!r:.80}')
    messages = [{'role': 'user', 'content': text}]
    if self._system_prompt is not None:
      messages.insert(0, {'role': 'system', 'content': self._system_prompt})
    return self.encode(self.apply_chat_template(messages))

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
    ids = _tokenizer.check_ids(ids, self._vocab_size)
    return self._tok.decode(ids.tolist(), skip_special_tokens=skip_special)

  def __repr__(self) -> str:
    return f'HFTokenizer({self.path!r}, vocab_size={self.vocab_size})'
