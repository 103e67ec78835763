"""``apt-hal generate --onnx`` on an exported folder, for tests/test_compile_past.py and
tests/test_compile_seq2seq_past.py."""

import contextlib
import io

from apt_hal.cli import main as apt_hal_main
from apt_hal.models import GenerationConfig

PROMPT = "the river"


def generate_on_the_command_line(folder, runner_class) -> tuple[str, str]:
    """Write a small tokenizer into ``folder``, run ``apt-hal generate --onnx folder`` greedily for 12
    tokens, and return what it printed and what ``runner_class(folder)`` generates for the same
    prompt, as text."""
    from apt_hal.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["the river runs to the sea at night"] * 20, vocab_size=300)
    for name, content in tokenizer.to_files().items():
        (folder / name).write_bytes(content)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = apt_hal_main(["generate", "--onnx", str(folder), "--prompt", PROMPT, "--greedy",
                             "--max-new-tokens", "12"])
    assert code == 0, err.getvalue()
    config = GenerationConfig(max_new_tokens=12, greedy=True, stop_tokens=(tokenizer.eos_id,))
    expected = runner_class(folder).generate([tokenizer.encode(PROMPT, bos=True)], config)[0]
    return out.getvalue().strip(), (PROMPT + tokenizer.decode(expected)).strip()
