"""``apt-hal train``, ``generate`` and ``chat``: the commands a user runs, end to end on a tiny model."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

from apt_hal import get_device
from apt_hal.cli import main
from apt_hal.models import GenerationConfig, generate
from apt_hal.models import checkpoint as ckpt
from apt_hal.nn import MXFP4Linear

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = str(ROOT / "examples" / "tiny.txt")
TINY_RUN = ["--data", DATA, "--model", "apt-dense-tiny", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300",
            "--precision", "fp32", "--log-every", "5"]




def _run(*argv):
    """``apt-hal ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code, stdout, stderr = _run("train", *TINY_RUN, "--out", str(out), "--steps", "20", "--eval-every", "10",
                                "--save-every", "10")
    assert code == 0, stderr
    return out, stdout


def test_train_reports_progress_evaluation_and_atomic_checkpoints(run_dir):
    out, stdout = run_dir
    lines = stdout.splitlines()
    assert lines[0].startswith("model dense: ") and "vocab 300" in lines[0] and f"{get_device()}, fp32" in lines[0]
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["5/20", "10/20", "15/20", "20/20"]
    assert all(" loss " in line and "tok/s" in line for line in progress)
    assert [line.split(":")[0] for line in lines if line.startswith("eval")] == ["eval  step 10", "eval  step 20"]
    assert any("perplexity" in line for line in lines)
    assert lines[-1].startswith("done: step 20, ") and lines[-1].endswith(f"latest checkpoint {out / 'step-00000020'}")
    latest = ckpt.latest_checkpoint(out)
    assert latest == out / "step-00000020"
    manifest = ckpt.verify_checkpoint(latest)
    assert set(manifest["files"]) == {"model.safetensors", "training_state.pt", "config.json", "tokenizer.json",
                                      "tokenizer_config.json", "run.json"}
    assert json.loads((latest / "config.json").read_text())["vocab_size"] == 300


def test_generate_prints_the_prompt_and_what_the_model_api_generates(run_dir):
    out, _ = run_dir
    code, stdout, _ = _run("generate", "--checkpoint", str(out), "--prompt", "The river", "--greedy",
                           "--max-new-tokens", "12")
    assert code == 0
    model, tok, _ = ckpt.load_trained_model(out)
    expected = generate(model, [tok.encode("The river", bos=True)],
                        GenerationConfig(max_new_tokens=12, greedy=True, stop_tokens=(tok.eos_id,)))[0]
    assert stdout == "The river" + tok.decode(expected) + "\n"

    sampled = [_run("generate", "--checkpoint", str(out), "--prompt", "The river", "--seed", str(s),
                    "--max-new-tokens", "12")[1] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1], "the same seed gives the same text"
    assert sampled[0] != sampled[2], "another seed gives another sample"

    continuation = stdout[len("The river"):-1]
    stop = continuation[3:5]
    code, stopped, _ = _run("generate", "--checkpoint", str(out / "step-00000020"), "--prompt", "The river",
                            "--greedy", "--max-new-tokens", "12", "--stop", stop)
    assert stopped == "The river" + continuation[:continuation.index(stop) + len(stop)] + "\n"


def test_generate_and_chat_reject_bad_input_with_clear_errors(run_dir, tmp_path):
    out, _ = run_dir
    cases = [
        (["generate", "--checkpoint", str(out), "--prompt", "  "], "--prompt is empty"),
        (["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"], "no checkpoint at"),
        (["generate", "--checkpoint", str(tmp_path), "--prompt", "x"], "no complete checkpoint in"),
        (["generate", "--checkpoint", str(out), "--prompt", "mill " * 600], "too long"),
        (["generate", "--checkpoint", str(out), "--prompt", "x", "--temperature", "0"], "temperature must be > 0"),
        (["chat", "--checkpoint", str(out), "--top-p", "2"], "top_p must be in"),
    ]
    for argv, message in cases:
        code, _, stderr = _run(*argv)
        assert code == 2 and message in stderr and stderr.startswith(f"apt-hal {argv[0]}: error:"), (argv, stderr)


def test_train_rejects_what_it_cannot_do(run_dir, tmp_path):
    out, _ = run_dir
    fresh = str(tmp_path / "fresh")
    cases = [
        (["--data", DATA, "--out", fresh], "--model is required"),
        (["--data", str(tmp_path / "missing.txt"), "--model", "apt-dense-tiny", "--out", fresh], "missing.txt"),
        ([*TINY_RUN, "--out", str(out)], "already holds checkpoints"),
        ([*TINY_RUN, "--out", fresh, "--model", "apt-seq2seq-tiny"], "causal language models"),
        ([*TINY_RUN, "--out", fresh, "--seq-len", "1024"], "longer than the model's max_position=512"),
        ([*TINY_RUN, "--out", fresh, "--model", "apt-nano"], "unknown preset 'apt-nano'"),
        ([*TINY_RUN, "--out", fresh, "--vocab-size", "100"], "vocab_size must be >= 259"),
        ([*TINY_RUN, "--out", fresh, "--mxfp4", "mlp"], "convert no Linear layer"),
    ]
    for argv, message in cases:
        code, _, stderr = _run("train", *argv)
        assert code == 2 and message in stderr, (argv, stderr)
    assert not (tmp_path / "fresh").exists() or not list((tmp_path / "fresh").iterdir())


def test_train_resume_continues_from_the_latest_checkpoint_with_its_config_and_tokenizer(tmp_path):
    out = tmp_path / "run"
    assert _run("train", *TINY_RUN, "--out", str(out), "--steps", "4", "--save-every", "2")[0] == 0
    code, stdout, stderr = _run("train", "--data", DATA, "--out", str(out), "--resume", "--steps", "6",
                                "--seq-len", "32", "--batch-size", "4", "--precision", "fp32")
    assert code == 0, stderr
    assert f"resumed from {out / 'step-00000004'} at step 4" in stdout
    assert ckpt.latest_checkpoint(out) == out / "step-00000006"
    tokenizers = [(out / f"step-0000000{step}" / "tokenizer.json").read_bytes() for step in (4, 6)]
    assert tokenizers[0] == tokenizers[1], "the resumed run keeps the checkpoint's tokenizer"


@pytest.mark.parametrize("damage, message", [
    ({ckpt.MODEL_FILE: b"\x00not safetensors" * 8}, f"{ckpt.MODEL_FILE}: not a valid safetensors file"),
    ({ckpt.STATE_FILE: b"torn"}, f"{ckpt.STATE_FILE}: unreadable training state"),
])
def test_train_resume_from_an_unreadable_checkpoint_is_one_line(damage, message, tmp_path):
    """Files damaged before their manifest was written (so it verifies): loading must still say
    which file is wrong in one line."""
    import hashlib

    out = tmp_path / "run"
    assert _run("train", *TINY_RUN, "--out", str(out), "--steps", "2", "--save-every", "2")[0] == 0
    folder = ckpt.latest_checkpoint(out)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    for name, content in damage.items():
        (folder / name).write_bytes(content)
        manifest["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    code, _, stderr = _run("train", "--data", DATA, "--out", str(out), "--resume", "--steps", "4")
    assert code == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("apt-hal train: error: ") and message in stderr, stderr


def test_train_with_mxfp4_linears_saves_a_checkpoint_that_generates(tmp_path):
    out = tmp_path / "fp4"
    code, _, stderr = _run("train", *TINY_RUN, "--out", str(out), "--steps", "2", "--mxfp4", "ffn")
    assert code == 0, stderr
    latest = ckpt.latest_checkpoint(out)
    assert json.loads((latest / "run.json").read_text()) == {"mxfp4": ["ffn"]}
    model, _, _ = ckpt.load_trained_model(out)
    converted = [name for name, m in model.named_modules() if isinstance(m, MXFP4Linear)]
    assert converted and all(".ffn." in name for name in converted), converted
    code, stdout, _ = _run("generate", "--checkpoint", str(out), "--prompt", "The mill", "--greedy",
                           "--max-new-tokens", "4")
    assert code == 0 and stdout.startswith("The mill")


def test_chat_answers_each_line_on_stdin_handles_commands_and_quits(run_dir):
    out, _ = run_dir
    lines = ["The miller", "", "/what", "His daughter", "/reset", "The miller", "/quit", "never read"]
    done = subprocess.run([sys.executable, "-m", "apt_hal.cli", "chat", "--checkpoint", str(out), "--greedy",
                           "--max-new-tokens", "10"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    replies = done.stdout.splitlines()
    assert len(replies) == 4 and replies[2] == "(new conversation)"
    assert replies[3] == replies[0], "after /reset, the same message gets the same greedy reply"
    assert "error: an empty message" in done.stderr and "error: unknown command '/what'" in done.stderr

    model, tok, _ = ckpt.load_trained_model(out)
    first = tok.encode("The miller", bos=True, eos=True) + [tok.bos_id]
    expected = generate(model, [first], GenerationConfig(max_new_tokens=10, greedy=True, stop_tokens=(tok.eos_id,)))
    assert replies[0] == tok.decode(expected[0]), "the reply is the paragraph the model writes after the message"


@pytest.mark.parametrize("command", ["train", "generate", "chat"])
def test_every_command_help_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"examples:\n  apt-hal {command} " in capsys.readouterr().out
