"""The APT tokenizer: byte-level BPE from the ``tokenizers`` library, trained locally or loaded.

Nothing is downloaded: :meth:`Tokenizer.train` learns the merges from the training text, and
:meth:`Tokenizer.load` reads a ``tokenizer.json`` (the ``tokenizers`` format, as found next to
Hugging Face checkpoints).

* Byte-level: every string, whatever its characters, encodes and decodes back exactly, so there
  is no unknown token. The 256 byte symbols are always in the vocabulary, hence
  ``vocab_size >= 256 + 3``.
* Special tokens are explicit: ``bos``, ``eos`` and ``pad`` (``<|bos|>``, ``<|eos|>``,
  ``<|pad|>``, ids 0, 1, 2 when trained here). :meth:`encode` never produces them from text: a
  prompt that spells ``<|eos|>`` is encoded as its bytes, so user text cannot inject a control
  token; callers add ``bos`` / ``eos`` explicitly.
* Files: ``tokenizer.json`` plus ``tokenizer_config.json`` naming the special tokens with the keys
  Hugging Face uses (``bos_token``, ``eos_token``, ``pad_token``). Loading a ``tokenizer.json``
  without that file assumes our names.

``tokenizers`` is imported inside the functions that need it: ``apt_hal.models`` itself imports
only torch, apt_hal and the standard library.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Optional, Sequence, Union

__all__ = ["Tokenizer", "SPECIAL_TOKENS", "MIN_VOCAB_SIZE"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

PathLike = Union[str, pathlib.Path]


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with its three special tokens resolved to ids.

    Build one with :meth:`train` or :meth:`load`; the constructor wraps an existing
    ``tokenizers.Tokenizer`` and checks that ``bos_token`` and ``eos_token`` are in its vocabulary
    (``pad_token`` may be absent: padding then uses ``eos``).
    """

    def __init__(self, backend, bos_token: str = SPECIAL_TOKENS["bos_token"],
                 eos_token: str = SPECIAL_TOKENS["eos_token"], pad_token: Optional[str] = SPECIAL_TOKENS["pad_token"]):
        self.backend = backend
        # Text that happens to spell a special token is ordinary text (see the module docstring).
        backend.encode_special_tokens = True
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self.bos_id = self._required_id("bos_token", bos_token)
        self.eos_id = self._required_id("eos_token", eos_token)
        pad_id = backend.token_to_id(pad_token) if pad_token is not None else None
        self.pad_id = self.eos_id if pad_id is None else pad_id

    def _required_id(self, role: str, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"Tokenizer: {role} {token!r} is not in the vocabulary; name the right token in "
                             f"{CONFIG_FILE} (key {role!r})")
        return token_id

    # ---------------------------------------------------------------------------------------
    # Building, saving, loading
    # ---------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2) -> "Tokenizer":
        """Learn a byte-level BPE vocabulary of at most ``vocab_size`` tokens from ``texts``.

        The result has fewer tokens when the text offers fewer merges than asked for; the special
        tokens take ids 0, 1, 2. Training is deterministic: the same text gives the same tokenizer.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"Tokenizer.train: vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS.values()),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Load ``path``: a ``tokenizer.json`` file, or a folder holding one (and, optionally, its
        ``tokenizer_config.json`` naming the special tokens)."""
        path = pathlib.Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"Tokenizer.load: no tokenizer file at {file}")
        config_file = file.with_name(CONFIG_FILE)
        names = dict(SPECIAL_TOKENS)
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
            # Hugging Face writes a special token either as a string or as {"content": ...}.
            names.update({k: v["content"] if isinstance(v, dict) else v
                          for k, v in config.items() if k in SPECIAL_TOKENS})
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_file(str(file)), **names)

    def to_files(self) -> dict[str, bytes]:
        """The files that :meth:`load` reads back, by name (a checkpoint writes them atomically)."""
        return {TOKENIZER_FILE: self.backend.to_str().encode("utf-8"),
                CONFIG_FILE: json.dumps(self.special_tokens, indent=2).encode("utf-8")}

    # ---------------------------------------------------------------------------------------
    # Encoding
    # ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with ``bos`` / ``eos`` added around it when asked."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens are dropped."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id})")
