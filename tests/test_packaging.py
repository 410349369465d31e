"""The wheel installs one import package, ``iqa_verify`` (the repository's ``properties/`` and
``reference/`` ship under it), finds its families and kernel providers through entry points, and
verifies a kernel file that lives outside the repository, as a new user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_declared_in_pyproject() -> None:
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("iqa_verify", "iqa_verify"), ("properties", "iqa_verify.properties"),
                      ("reference", "iqa_verify.reference")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    assert declared == found, f"undeclared: {sorted(found - declared)}; declared but missing: {sorted(declared - found)}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("iqa_verify-*.whl")
    return path


def test_the_wheel_installs_only_the_iqa_verify_package(wheel: Path) -> None:
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"iqa_verify"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "iqa_verify/properties/generic.py" in names and "iqa_verify/reference/la_forward.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[iqa_verify.families]" in text and "[iqa_verify.kernels]" in text


def test_installed_wheel_checks_a_kernel_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv that sees this environment's dependencies (torch, hypothesis) but not its editable
    iqa_verify: the wheel's copy is the one that runs, from a folder outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # dependencies from this environment, by path (its .pth files, the editable finder among them, are not run)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "my_kernel.py").write_text(
        "import torch\n"
        "def la_forward(q, k, v, g, initial_state=None, *, scale=1.0):\n"
        "    B, T, H, D = q.shape\n"
        "    acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype\n"
        "    s = initial_state.to(acc) if initial_state is not None else q.new_zeros(B, H, D, v.shape[-1], dtype=acc)\n"
        "    out = []\n"
        "    for t in range(T):\n"
        "        s = torch.exp(g[:, t].to(acc))[..., None, None] * s + k[:, t].to(acc)[..., :, None] * v[:, t].to(acc)[..., None, :]\n"
        "        out.append(scale * torch.einsum('bhd,bhde->bhe', q[:, t].to(acc), s))\n"
        "    return torch.stack(out, 1).to(q.dtype), s\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GITHUB_STEP_SUMMARY")}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import iqa_verify, iqa_verify.properties as p; print(iqa_verify.__file__, p.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and str(ROOT) not in where.stdout and site in where.stdout, where.stdout + where.stderr
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "iqa_verify", "check", "my_kernel.py:la_forward",
                           "--family", "la-forward", "--profile", "smoke", "--no-db"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "la-forward" in proc.stdout
