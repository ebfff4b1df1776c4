"""The locks: every install takes exact, hashed versions that agree with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
RUNTIME_LOCK = ROOT / "requirements-runtime.lock"


def pins(path: Path) -> dict[tuple[str, str], str]:
    """(name, marker) -> version of each requirement in a lock, checking each has hashes."""
    text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
    out: dict[tuple[str, str], str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *hashes = line.split(" --hash=")
        assert hashes, f"{path.name}: {spec} has no hash"
        assert all(h.startswith("sha256:") for h in hashes), spec
        req = Requirement(spec)
        [clause] = req.specifier
        assert clause.operator == "==", f"{path.name}: {spec} is not an exact pin"
        out[(canonicalize_name(req.name), str(req.marker or ""))] = clause.version
    return out


def pyproject() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    return {"": project["dependencies"], **extras}


def test_every_requirement_of_pyproject_is_locked_within_its_range() -> None:
    locked = pins(LOCK)
    for group, requirements in pyproject().items():
        for text in requirements:
            req = Requirement(text)
            versions = [v for (name, _), v in locked.items() if name == canonicalize_name(req.name)]
            assert versions, f"{req.name} ({group or 'dependencies'}) is not in the lock"
            for version in versions:
                assert req.specifier.contains(version, prereleases=True), (
                    f"{req.name}=={version} is outside {req.specifier}"
                )


def test_runtime_lock_is_the_service_closure_at_the_full_locks_versions() -> None:
    full = pins(LOCK)
    runtime = pins(RUNTIME_LOCK)
    for key, version in runtime.items():
        # A pin without a marker in the full lock covers the runtime lock's narrower marker
        # (the service needs typing-extensions on old Pythons only, the type checker on all).
        locked = full.get(key) or full.get((key[0], ""))
        assert locked == version, f"{key[0]}: runtime lock {version}, full {locked}"
    names = {name for name, _ in runtime}
    for text in pyproject()[""] + pyproject()["build"]:
        assert canonicalize_name(Requirement(text).name) in names
    # Test and development tools stay out of the image.
    assert not names & {"pytest", "mypy", "ruff", "uv", "hypothesis"}


def test_the_environment_running_the_tests_is_the_lock() -> None:
    for (name, marker), version in pins(LOCK).items():
        if marker and not Marker(marker).evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name}=={version} is locked but not installed")
        assert installed == version, f"{name}: installed {installed}, locked {version}"


def test_make_and_the_image_install_from_the_locks_only() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "pip install -q --require-hashes --no-deps -r $(LOCK)" in makefile
    assert "pip install -q --no-deps --no-build-isolation -e ." in makefile
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs == [
        " && /opt/ingest/bin/pip install --require-hashes --no-deps -r requirements-runtime.lock \\",
        " && /opt/ingest/bin/pip install --no-deps --no-build-isolation . \\",
    ]
