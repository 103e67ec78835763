"""apt_hal.compile: export HAL models to ONNX and TensorRT, validated against eager.

    apt-compile --target onnx --model apt-moe-tiny --output out/moe --dynamic-batch --dynamic-seq

or in Python::

    from apt_hal.compile import compile_model, export_onnx
    result = compile_model("apt-moe-tiny", "out/moe", target="onnx", dynamic_batch=True, dynamic_seq=True)
    exported = export_onnx(module, example_args, "op.onnx", target="onnx", dynamic={"x": {0: "tokens"}})

Modules: :mod:`~apt_hal.compile.lowering` (the lowering table: every apt_hal op per target),
:mod:`~apt_hal.compile.export` (torch.export -> ONNX), :mod:`~apt_hal.compile.validate` (run and
compare with eager), :mod:`~apt_hal.compile.tensorrt` (readiness report, build script, engine),
:mod:`~apt_hal.compile.api` (the whole pipeline), :mod:`~apt_hal.compile.cli` (``apt-compile``),
:mod:`~apt_hal.compile.past` (the past/present KV-cache graph of decoder-only models),
:mod:`~apt_hal.compile.seq2seq_past` (the encoder + decoder + decoder-with-past graphs of seq2seq models),
:mod:`~apt_hal.compile.ort_generate` (generation on ONNX Runtime from an exported folder:
``ort_generate.load(folder).generate(prompts, GenerationConfig(...))``), :mod:`~apt_hal.compile.runner_configs`
(``config.json`` and ``genai_config.json`` beside the graph).

Needs the ``export`` extra (onnx, onnxscript, onnxruntime): ``pip install "apt-hal[export]"``.
The names below load on first use, so ``apt-compile`` can say so when they are missing.
"""

import importlib

_WHERE = {"compile_model": "api", "load_model": "api", "CompileResult": "api", "export_onnx": "export",
          "Exported": "export", "ExportError": "export", "LOWERINGS": "lowering", "PROFILES": "lowering",
          "InputSet": "validate", "Validation": "validate", "tolerance": "validate", "OrtCausalLM": "ort_generate",
          "OrtSeq2SeqLM": "ort_generate", "CausalLMWithPast": "past"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"apt_hal.compile.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'apt_hal.compile' has no attribute {name!r}")
