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
_.AITER_UNAVAILABLE  # public: why aiter's rotary is unregistered (docs/rocm.md)
_.VLLM_XPU_UNAVAILABLE  # public: why vllm-xpu-kernels' rotary is unregistered (docs/xpu.md)
_.pytest_addoption  # pytest hook (tests/conftest.py)
_.pytest_collection_modifyitems  # pytest hook (tests/conftest.py)
_.dot_kernel  # compiled by module and name in a subprocess (tests/compile_kernels.py, tests/test_compile_matrix.py)
_.ptx_kernel  # compiled by module and name in a subprocess (tests/compile_kernels.py, tests/test_compile_matrix.py)
_.__spec__  # read by importlib on the fake vendor modules (tests/fakes/)
_.__path__  # read by importlib: makes a fake vendor module a package (tests/fakes/habana_fake.py)
_.__class__  # assigned to give a tensor the fake npu subclass (tests/fakes/npu_device.py)
_._is_in_bad_fork  # called by torch on a registered device module (tests/fakes/npu_device.py)
_.manual_seed_all  # called by torch.manual_seed on a registered device module (tests/fakes/npu_device.py)

# Parameters of tests/fakes/torch_npu_fake.py that the fake does not model: they keep torch_npu's published
# signatures, so a binding that passes them by keyword is checked against the real names.
_.group_select_mode
_.out_flag
_.active_num
_.expert_capacity
_.antiquant_offset
_.activation_input
_.activation_quant_scale
_.activation_quant_offset
_.per_token_scale
_.act_type
_.tuning_config
_.export_for_source_row
_.quant_scale
_.quant_offset
_.inner_precise
_.compress_lens
_.compress_seq_offsets
