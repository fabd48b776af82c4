"""The two set-up commands README's Quickstart starts with: `make demo` and `make test` create .venv,
install torch's CPU wheel before the package with every extra, and do it once (stamps in .venv); a
changed setup.py reinstalls, a changed C source only rebuilds the extension; `make` alone and
`PYTHON=...` need no .venv. Checked on a copy of the project whose .venv/bin/python is a stub that
logs its arguments, so nothing is really installed."""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

STUB_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
"""


def make_env():
    """The environment without what an outer `make test` passes down (MAKEFLAGS carries its command-line
    variables, e.g. PYTHON=...) or ASan preloads into every process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTHON", "VENV", "PYTEST_ARGS", "LD_PRELOAD")}
    return env


def make(project, *args):
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=project, env=make_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def age(path, seconds):
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


@pytest.fixture
def project(tmp_path):
    """What the Makefile's set-up reads, copied with every file 1000 s old; a built extension in place."""
    dst = tmp_path / "project"
    for name in ("Makefile", "setup.py", "pyproject.toml"):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "runtime", dst / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "python/tinyllm").mkdir(parents=True)
    shutil.copy(ROOT / "python/tinyllm/_runtime.cpp", dst / "python/tinyllm/_runtime.cpp")
    (dst / "python/tinyllm/_runtime.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    for path in dst.rglob("*"):
        age(path, 1000)
    return dst


def with_stub_venv(project):
    python = project / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    return project / ".venv/calls.log"


def pip_calls(log):
    return log.read_text().splitlines() if log.exists() else []


def installs(plan):
    """The lines of a `make -n` plan that would create the venv or install something."""
    return [line for line in plan.splitlines() if "pip install" in line or "-m venv" in line]


def test_a_fresh_clone_creates_the_venv_then_torch_then_the_package(project):
    plan = make(project, "-n", "demo")
    steps = [plan.index(s) for s in ("python3 -m venv .venv", "install -q torch==2.13.0",
                                     'install -q -e ".[train,serve,dev]"',
                                     "./run models/stories15M.bin -z models/tok5000.bin")]
    assert steps == sorted(steps), plan


def test_first_setup_installs_once_and_a_second_run_reinstalls_nothing(project):
    log = with_stub_venv(project)
    out = make(project, "setup")
    assert pip_calls(log) == ["-m pip install -q torch==2.13.0", "-m pip install -q -e .[train,serve,dev]"]
    assert out.splitlines()[0].startswith("==> ")  # says what it does

    make(project, "setup")
    assert len(pip_calls(log)) == 2
    for target in ("demo", "test"):
        plan = make(project, "-n", target)
        assert installs(plan) == [], plan
    assert "./run models/stories15M.bin" in make(project, "-n", "demo")
    assert ".venv/bin/python -m pytest -q tests" in make(project, "-n", "test")


def test_a_changed_setup_py_reinstalls_and_a_changed_c_source_only_rebuilds_the_extension(project):
    log = with_stub_venv(project)
    make(project, "setup")
    for stamp in (".venv/.tinyllm-installed", ".venv/.tinyllm-extension"):
        age(project / stamp, 500)

    age(project / "runtime/model.c", 100)
    make(project, "setup")
    assert pip_calls(log)[2:] == ["-m pip install -q --no-deps -e ."]
    make(project, "setup")
    assert len(pip_calls(log)) == 3

    age(project / "setup.py", 0)
    make(project, "setup")
    assert pip_calls(log)[3:] == ["-m pip install -q torch==2.13.0", "-m pip install -q -e .[train,serve,dev]"]


def test_a_removed_extension_is_rebuilt(project):
    log = with_stub_venv(project)
    make(project, "setup")
    make(project, "clean")
    make(project, "setup")
    assert pip_calls(log)[2:] == ["-m pip install -q --no-deps -e ."]


def test_make_alone_and_a_given_python_need_no_venv(project):
    plan = make(project, "-n")
    assert "-o run " in plan and "-o libtinyllm.so " in plan and installs(plan) == [], plan
    plan = make(project, "-n", "test", "PYTHON=python3", "PYTEST_ARGS=-q tests/test_tokenizer.py")
    assert installs(plan) == [], plan
    assert "python3 -m pytest -q tests/test_tokenizer.py" in plan


def quickstart_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart\n", 1)[1]
    first_block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in first_block.splitlines() if line.split("#")[0].strip()]


def test_readme_starts_with_the_two_targets_and_ci_runs_the_same(project):
    assert quickstart_commands() == ["make demo", "make test"]
    for target in ("demo", "test"):
        make(project, "-n", target)  # exists
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in ci
    assert not any("pip install" in line or "venv" in line for line in ci), ci  # one place for set-up


def test_gitignore_covers_what_readme_creates():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [".venv/bin/python", "my/tok/tok.model", "out/sft/ckpt.pt"]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == paths
