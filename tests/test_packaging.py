"""One import namespace: backends/, models/, compile/ and conformance/ install as apt_hal.*, from an
editable install and from a built wheel alike, and nothing generic lands at the top level."""

import importlib
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBPACKAGES = ["apt_hal.backends", "apt_hal.models", "apt_hal.compile", "apt_hal.conformance"]


def _declared():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def test_every_package_folder_is_declared():
    declared, mapping = _declared()
    found = set()
    for package, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found == declared, f"pyproject.toml packages differ from the folders: {sorted(found ^ declared)}"


def test_the_installed_package_imports_every_part_from_this_checkout():
    for name in ["apt_hal", *SUBPACKAGES]:
        mod = importlib.import_module(name)
        assert ROOT in pathlib.Path(mod.__file__).resolve().parents, (name, mod.__file__)


@pytest.mark.slow
def test_a_built_wheel_imports_every_part(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel, = (tmp_path / "dist").glob("apt_hal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"apt_hal", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for pkg in SUBPACKAGES + ["apt_hal.backends.cuda_triton"]:
        assert pkg.replace(".", "/") + "/__init__.py" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # -S: no site processing, so the editable install's finder is not active; torch comes from
    # site-packages placed after the wheel's folder.
    code = ("import importlib, pathlib\n"
            f"for n in {['apt_hal', *SUBPACKAGES]!r}:\n"
            "    m = importlib.import_module(n)\n"
            f"    assert pathlib.Path(m.__file__).is_relative_to({str(tmp_path / 'site')!r}), m.__file__\n"
            "import apt_hal.registry; print(len(apt_hal.registry.backends()))\n")
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"}
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 7
