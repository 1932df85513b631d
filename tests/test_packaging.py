"""The project as a package: the layering (dftune never imports a root entry file), requirements.txt and
pyproject.toml agreeing, the wheel's contents and entry points, and the console scripts from another folder."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from helpers import ROOT, SAMPLE_FILES, TINY_MODEL, child_env

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one

ROOT_ENTRY_FILES = {"train_dft", "dft_trainer", "data_utils", "dist_logger"}
CONSOLE_SCRIPTS = {"dft-train", "dft-eval", "dft-compare", "dft-inspect"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_never_imports_a_root_file():
    offenders = {str(path.relative_to(ROOT)): sorted(imported_modules(path) & ROOT_ENTRY_FILES)
                 for path in (ROOT / "dftune").rglob("*.py") if imported_modules(path) & ROOT_ENTRY_FILES}
    assert offenders == {}


def test_the_root_holds_the_entry_files_and_no_other_module():
    assert {path.stem for path in ROOT.glob("*.py")} == ROOT_ENTRY_FILES


def test_scripts_need_no_path_tricks():
    tricks = [str(path.relative_to(ROOT)) for path in [*ROOT.glob("scripts/*.py"), *(ROOT / "dftune").rglob("*.py")]
              if "sys.path.insert(0, os.path.dirname" in path.read_text(encoding="utf-8")]
    assert tricks == []


def _requirement_bounds(lines: list[str]) -> dict[str, str]:
    bounds = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
            bounds[name] = line[len(name):].replace(" ", "")
    return bounds


def test_requirements_txt_and_pyproject_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = _requirement_bounds((ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines())
    runtime = _requirement_bounds(project["dependencies"])
    dev = _requirement_bounds(project["optional-dependencies"]["dev"])
    gpu = _requirement_bounds(project["optional-dependencies"]["gpu"])
    assert requirements == {**runtime, **dev}
    assert gpu == _requirement_bounds((ROOT / "requirements-gpu.txt").read_text(encoding="utf-8").splitlines())
    assert set(project["scripts"]) == CONSOLE_SCRIPTS


@pytest.mark.integration
def test_the_wheel_holds_every_sub_package_and_the_console_scripts(tmp_path):
    # From a copy of the tracked files: setuptools builds in the source tree (build/, *.egg-info), where a
    # module removed since an earlier build would still be picked up.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300, env=child_env())
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("dft_trainer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {name for name in names if name.endswith(".py")}
    expected = {str(path.relative_to(ROOT)) for path in (ROOT / "dftune").rglob("*.py")} | {"train_dft.py"}
    assert packaged == expected  # every module, nothing else at the top level (no data_utils in site-packages)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {line.split(" = ")[0] for line in entry_points.splitlines() if " = " in line} == CONSOLE_SCRIPTS


@pytest.mark.integration
def test_console_scripts_run_from_another_folder(tmp_path):
    """dft-train with the bundled tiny model, then dft-eval and dft-inspect on what it wrote, all from a folder
    that is not the checkout (relative paths resolve against it)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "dft-train").exists():
        pytest.fail(f"the console scripts are not installed in {bin_dir}: run `make env` (pip install -e .)")
    (tmp_path / "data.jsonl").write_text(Path(SAMPLE_FILES[0]).read_text(encoding="utf-8"), encoding="utf-8")
    env = {**child_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(["dft-train", "--model_name_or_path", str(TINY_MODEL), "--data_files", "data.jsonl", "--output_dir", "out",
                          "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "run_summary.json").is_file()
    inspect = subprocess.run(["dft-inspect", "--model_name_or_path", "out", "--data_files", "data.jsonl", "--color", "never"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert inspect.returncode == 0 and "[[" in inspect.stdout, inspect.stderr[-2000:]
    missing = subprocess.run(["dft-eval", "--model_name_or_path", "out", "--output_dir", "ev"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("error: "), missing.stderr[-2000:]
