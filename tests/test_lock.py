"""requirements.lock: every package of the core and of each extra at one release with its hashes, and
.ci/check-lock refusing a lock made from another pyproject.toml."""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

from conftest import ROOT

STALE = "requirements.lock was made from another pyproject.toml: run make lock\n"


def locked() -> dict[str, str]:
    """Each package in the lock and its release."""
    return {name: version for name, version in
            re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+) \\$", (ROOT / "requirements.lock").read_text(), re.M)}


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def check_lock(folder):
    return subprocess.run([str(folder / ".ci" / "check-lock")], cwd=folder, capture_output=True, text=True)


def copy_of_the_repo(tmp_path):
    shutil.copytree(ROOT / ".ci", tmp_path / ".ci")
    for name in ("pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_lock_pins_every_requirement_of_the_core_and_of_each_extra_with_hashes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pins = locked()
    assert sorted({requirement_name(r) for r in wanted} - set(pins)) == []
    assert pins["torch"] == "2.13.0+cpu"
    entries = re.split(r"\n(?=[a-z0-9])", (ROOT / "requirements.lock").read_text().split("\n", 1)[1])
    assert len(entries) == len(pins) and all("--hash=sha256:" in entry for entry in entries)


def test_the_committed_lock_was_made_from_the_committed_pyproject():
    result = check_lock(ROOT)
    assert (result.returncode, result.stderr) == (0, "")


def test_a_changed_pyproject_without_a_new_lock_is_refused_naming_the_command(tmp_path):
    repo = copy_of_the_repo(tmp_path)
    assert check_lock(repo).returncode == 0
    pyproject = repo / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"rich>=13",', '"rich>=13",\n    "tqdm>=4",'))
    result = check_lock(repo)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", STALE)


def test_a_missing_lock_is_refused_the_same_way(tmp_path):
    repo = copy_of_the_repo(tmp_path)
    (repo / "requirements.lock").unlink()
    result = check_lock(repo)
    assert (result.returncode, result.stderr) == (2, STALE)
