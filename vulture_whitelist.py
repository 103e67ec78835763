"""Names vulture cannot see used: hooks that torch, Python or a library calls, attributes it reads.

Checked with ``vulture`` (configured in pyproject.toml); list a name here only with the caller.
"""

_ = object  # vulture needs each name used somewhere; the object does not matter

_.extra_repr  # torch.nn.Module.__repr__ calls it (apt_hal/nn.py)
_.atexit  # weakref.finalize reads it at interpreter exit (apt_hal/registry.py)
_.__getattr__  # module-level attribute hook, PEP 562 (compile/__init__.py)
_.encode_special_tokens  # read by the tokenizers library (models/tokenizer.py)
_.pre_tokenizer  # read by the tokenizers library (models/tokenizer.py)
_.long_factor  # read by name through getattr (apt_hal/rope.py)
_._experts_implementation  # read by transformers from a model config (tests/test_moe.py)
_._attn_implementation  # read by transformers from a model config (tests/test_rope.py)
