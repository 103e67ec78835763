"""Greedy generation with ``optimum.onnxruntime.ORTModelForCausalLM`` from a folder apt-compile wrote,
compared with the tokens apt_hal chose.

    python tests/optimum_check.py CASE.json

Runs in a virtual environment with optimum's ONNX Runtime support (see docs/optimum-ci.txt), which
has no apt_hal: it imports only torch, transformers and optimum. CASE.json holds ``folder`` (an ``apt-compile
--target onnx`` output), ``prompts`` (token id lists), ``max_new_tokens`` and ``expected`` (apt_hal's
new tokens for each prompt, ``apt_hal.models.generate`` with ``greedy=True`` and no stop token; the
folder's config.json names no end-of-sequence token, as apt-compile writes it without a tokenizer).
The prompts go in as one left-padded batch. Prints optimum's new tokens as JSON; exit status 0 when
they equal ``expected``, 1 when they do not.
"""

from __future__ import annotations

import json
import sys


def optimum_greedy(folder: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GenerationConfig

    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False,
                                                provider="CPUExecutionProvider")
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, width:].tolist()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        case = json.load(f)
    theirs = optimum_greedy(case["folder"], case["prompts"], case["max_new_tokens"])
    print(json.dumps({"optimum": theirs}))
    if theirs != case["expected"]:
        for row, (got, want) in enumerate(zip(theirs, case["expected"])):
            if got != want:
                first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                print(f"prompt {row}: optimum's tokens differ from apt_hal's from new token {first}: "
                      f"{got[first:first + 8]} != {want[first:first + 8]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
