"""A user's mistake on any command line is one line on stderr (naming the argument or file and what
is wrong) and an exit code, never a traceback; reports and exports are whole or absent."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from apt_hal import cli, cli_errors
from apt_hal.compile import cli as compile_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = str(ROOT / "examples" / "tiny.txt")
UNWRITABLE = "/proc/apt-hal-no-such-folder"  # procfs: nobody, root included, can create a file there
ONE_CASE = "rotary/float32/*"


def _call(main, argv):
    """``main(argv)`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's --version and --help
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_user_error(code, stderr, prog, *fragments, exit_code=2):
    assert code == exit_code, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---- apt-compile (item 12) ----------------------------------------------------------------------


def _compile(*argv):
    return _call(compile_cli.main, ["--target", "onnx", "--no-validate", *argv])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from apt_hal.models import ModelConfig, build_model
    from apt_hal.models.hf import save_pretrained

    folder = tmp_path_factory.mktemp("hf")
    save_pretrained(build_model(ModelConfig.preset("apt-dense-tiny")), folder)
    return folder


def test_apt_compile_refuses_a_bad_output_folder_before_loading_or_exporting(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(a_file, "is a file, not a folder"),
             (a_file / "sub", f"{a_file} is a file, so no folder can be made in it"),
             (UNWRITABLE, "cannot write in /proc")]
    for output, message in cases:
        code, stdout, stderr = _compile("--model", "apt-dense-tiny", "--output", str(output))
        assert_user_error(code, stderr, "apt-compile", f"--output {output}: {message}")
        assert "load:" not in stdout and "export:" not in stdout, "the check runs before any work"


def test_apt_compile_names_the_file_that_cannot_give_a_model(tmp_path, hf_folder):
    import shutil

    as_list = tmp_path / "list.json"
    as_list.write_text("[1, 2]")
    huge = tmp_path / "huge.json"
    from apt_hal.models import ModelConfig

    huge.write_text(json.dumps({**ModelConfig.preset("apt-dense-tiny").to_dict(), "d_model": 2 ** 40}))
    keyless = shutil.copytree(hf_folder, tmp_path / "keyless")
    config = json.loads((keyless / "config.json").read_text())
    del config["hidden_size"]
    (keyless / "config.json").write_text(json.dumps(config))
    corrupt = shutil.copytree(hf_folder, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00not safetensors" * 64)
    cases = [(as_list, f"{as_list}: a ModelConfig file holds a JSON object of fields, not a list"),
             (huge, f"{huge}: the model's"),
             (keyless, f"{keyless}: config.json (or the weights index) has no 'hidden_size' entry"),
             (corrupt, f"{corrupt / 'model.safetensors'}: not a valid safetensors file")]
    for model, message in cases:
        code, _, stderr = _compile("--model", str(model), "--output", str(tmp_path / "out"))
        assert_user_error(code, stderr, "apt-compile", message)


def test_apt_compile_writes_its_report_atomically(tmp_path, monkeypatch):
    renamed = _record_renames(monkeypatch)
    code, _, stderr = _compile("--model", "apt-dense-tiny", "--output", str(tmp_path))
    assert code == 0, stderr
    assert str(tmp_path / "compile_report.json") in renamed


def _record_renames(monkeypatch) -> list:
    """The destinations of every os.replace from now on (an atomic write ends with one)."""
    renamed, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(str(b)), real_replace(a, b))[1])
    return renamed


# ---- apt-hal conformance (item 13) --------------------------------------------------------------


def _conformance(*argv):
    return _call(cli.main, ["conformance", "--no-progress", *argv])


@pytest.fixture
def no_cases_run(monkeypatch):
    from apt_hal.conformance import runner

    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("cases ran before the usage error"))


@pytest.mark.usefixtures("no_cases_run")
def test_conformance_refuses_a_bad_report_folder_before_running_any_case(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for report, message in [(a_file, "is a file, not a folder"), (UNWRITABLE, "cannot write in /proc")]:
        code, _, stderr = _conformance("--backend", "cpu", "--case", ONE_CASE, "--report", str(report))
        assert_user_error(code, stderr, "apt-hal conformance", f"--report {report}: {message}")


def test_conformance_merge_of_a_file_that_is_not_a_report_is_a_usage_error(tmp_path):
    for name, text in [("garbage", "not JSON {"), ("a_list", "[1, 2]")]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "conformance.json").write_text(text)
        code, _, stderr = _conformance("--merge", str(folder), "--report", str(tmp_path / "merged"))
        assert_user_error(code, stderr, "apt-hal conformance", f"--merge {folder}: {folder / 'conformance.json'}")


@pytest.mark.usefixtures("no_cases_run")
def test_conformance_backend_names_are_checked(tmp_path):
    report = ["--report", str(tmp_path)]
    code, _, stderr = _conformance("--backend", "", *report)
    assert_user_error(code, stderr, "apt-hal conformance", "--backend '' names no backend", "'all'")
    code, _, stderr = _conformance("--backend", "cpu,cuda", *report)
    assert_user_error(code, stderr, "apt-hal conformance", "unknown backend 'cuda'; did you mean 'cuda-triton'?",
                      "give 'all' or comma-separated backend names")
    assert "'auto'" not in stderr
    code, _, stderr = _conformance("--backend", "cpu", "--require", "cpuu", *report)
    assert_user_error(code, stderr, "apt-hal conformance", "--require: unknown backend 'cpuu'; did you mean 'cpu'?")


def test_conformance_names_the_required_backend_that_did_not_run(tmp_path):
    code, stdout, _ = _conformance("--backend", "cpu,npu", "--require", "cpu,npu", "--case", ONE_CASE,
                                   "--quick", "--report", str(tmp_path))
    assert code == 8, stdout
    lines = stdout.splitlines()
    assert "required backend npu did not run: NOT_RUN torch_npu is not installed" in "\n".join(lines)
    assert not any(line.startswith("required backend cpu") for line in lines), "cpu ran"


def test_conformance_reports_are_written_atomically(tmp_path, monkeypatch):
    from apt_hal.conformance import reports

    code, _, _ = _conformance("--backend", "cpu", "--case", ONE_CASE, "--quick", "--report", str(tmp_path))
    assert code == 0
    renamed = _record_renames(monkeypatch)
    reports.write_all(reports.load(tmp_path), tmp_path)
    assert sorted(renamed) == sorted(str(tmp_path / f) for f in reports.FILES.values())


# ---- backends and devices of apt-hal's commands (item 14) ----------------------------------------


@pytest.mark.parametrize("backend, message", [
    ("cuda", "APT_HAL_BACKEND: unknown backend 'cuda'"),
    ("npu", "backend 'npu' is unavailable: torch_npu is not installed"),
])
def test_info_with_a_bad_backend_in_the_environment_says_so_in_one_line(backend, message):
    env = {**os.environ, "APT_HAL_BACKEND": backend}
    done = subprocess.run([sys.executable, "-m", "apt_hal.cli", "info"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert_user_error(done.returncode, done.stderr, "apt-hal info", message)


@pytest.mark.parametrize("command", ["train", "generate", "chat"])
def test_model_commands_refuse_unknown_backends_and_missing_devices_in_one_line(command, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    required = {"train": ["--data", DATA, "--out", str(tmp_path / "run"), "--model", "apt-dense-tiny"],
                "generate": ["--checkpoint", str(tmp_path), "--prompt", "x"],
                "chat": ["--checkpoint", str(tmp_path)]}[command]
    prog = f"apt-hal {command}"
    cases = [(["--backend", "cuda"], "unknown backend 'cuda'"),
             (["--device", "gpu"], "--device 'gpu' is not a device (e.g. cpu, cuda, cuda:1); did you mean 'cuda'?"),
             (["--device", "cdua:0"], "did you mean 'cuda'?"),
             (["--device", "cuda"], "--device cuda: this machine has no cuda device")]
    for extra, message in cases:
        code, _, stderr = _call(cli.main, [command, *required, *extra])
        assert_user_error(code, stderr, prog, message)


# ---- extras, versions and exit codes (item 15) ---------------------------------------------------


def test_train_without_the_models_extra_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what a base install without tokenizers imports
    code, _, stderr = _call(cli.main, ["train", "--data", DATA, "--model", "apt-dense-tiny",
                                       "--out", str(tmp_path / "run")])
    assert_user_error(code, stderr, "apt-hal train", "tokenizers", "pip install 'apt-hal[models]'")


def test_an_internal_error_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli_errors.run_command("apt-hal x", lambda: 1 // 0)
    missing_core = ModuleNotFoundError("No module named 'numpy'", name="numpy")
    with pytest.raises(ModuleNotFoundError):
        cli_errors.run_command("apt-hal x", lambda: (_ for _ in ()).throw(missing_core))


def test_version_and_exit_codes_in_every_help():
    import apt_hal

    for main, prog in [(cli.main, "apt-hal"), (compile_cli.main, "apt-compile")]:
        code, stdout, _ = _call(main, ["--version"])
        assert code == 0 and stdout.strip() == f"{prog} {apt_hal.__version__}"
    for command in cli.SUBCOMMANDS:
        code, stdout, _ = _call(cli.main, [command, "--help"])
        assert code == 0 and "exit codes" in stdout and "\n  2  " in stdout, command
    code, stdout, _ = _call(compile_cli.main, ["--help"])
    assert code == 0 and "exit codes:" in stdout


# ---- whole files (item 16) -------------------------------------------------------------------------


def test_an_interrupted_atomic_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    from apt_hal.atomic import atomic_write, atomic_write_text

    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def dies_midway(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies_midway)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_hugging_face_export_files_are_written_atomically(tmp_path, monkeypatch):
    from apt_hal.models import ModelConfig, build_model
    from apt_hal.models.hf import save_pretrained

    renamed = _record_renames(monkeypatch)
    save_pretrained(build_model(ModelConfig.preset("apt-dense-tiny")), tmp_path)
    assert sorted(renamed) == sorted(str(p) for p in tmp_path.iterdir())


def test_repro_bundles_are_written_atomically(tmp_path, monkeypatch):
    from apt_hal.conformance import repro

    renamed = _record_renames(monkeypatch)
    record = {"backend": "cpu", "id": "rotary/float32/x", "repro": None, "status": "FAIL"}
    rel = repro.write_bundle(tmp_path, record, {"inputs": {"q": torch.ones(2, 3)}, "expected": {"out": torch.ones(2)}},
                             seed=0)
    assert sorted(renamed) == sorted(str(p) for p in (tmp_path / rel).iterdir())
    assert repro.load(tmp_path / rel / "inputs.safetensors")["q"].equal(torch.ones(2, 3))
