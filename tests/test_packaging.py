"""Each packaging fact lives in one place: setup.cfg's ranges and the pinned requirement files agree.

setup.cfg holds what users install (``install_requires`` and the extras, as ranges);
requirements-dev.txt and requirements-bench.txt pin the development environment. A pin
outside its range, a package pinned but not declared, or declared but not pinned, fails here.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import platform
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def _requirements(lines: list[str]) -> list[Requirement]:
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(Requirement(line))
    return out


def _declared() -> dict[str, dict[str, Requirement]]:
    """setup.cfg: "install" and each extra -> {canonical name: requirement}."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    groups = {"install": cfg["options"]["install_requires"]}
    groups.update(cfg["options.extras_require"])
    return {
        name: {canonicalize_name(r.name): r for r in _requirements(text.splitlines())}
        for name, text in groups.items()
    }


def _pins(filename: str, python: str) -> dict[str, Requirement]:
    """The pins of a requirements file that apply to ``python`` (markers evaluated for it)."""
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    pins = {}
    for r in _requirements((ROOT / filename).read_text().splitlines()):
        if r.marker is None or r.marker.evaluate(env):
            name = canonicalize_name(r.name)
            assert name not in pins, f"{filename}: {r.name} is pinned twice for Python {python}"
            pins[name] = r
    return pins


def _pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier  # a pin is exactly one == or === clause
    assert spec.operator in ("==", "==="), f"{req}: pin with == (or === for torch), not {spec.operator}"
    return spec.version


@pytest.mark.parametrize("python", PYTHONS)
def test_dev_pins_satisfy_the_declared_ranges_and_nothing_else_is_pinned(python):
    declared = _declared()
    ranges = {**declared["install"], **declared["dev"]}
    pins = _pins("requirements-dev.txt", python)
    missing = sorted(set(ranges) - set(pins))
    assert not missing, (
        f"requirements-dev.txt does not pin {missing} (declared in setup.cfg) for Python {python}"
    )
    undeclared = sorted(set(pins) - set(ranges))
    assert not undeclared, (
        f"requirements-dev.txt pins {undeclared}, which setup.cfg's install/dev do not declare"
    )
    for name, pin in pins.items():
        version = _pinned_version(pin)
        assert ranges[name].specifier.contains(version, prereleases=True), (
            f"requirements-dev.txt pins {name}=={version} for Python {python}, outside setup.cfg's "
            f"{ranges[name]}; change one of them"
        )


def test_the_dev_extra_holds_every_optional_extra():
    """`pip install cachedata[dev]` gets what the vision, audio and text extras get."""
    declared = _declared()
    for extra in ("vision", "audio", "text"):
        for name, req in declared[extra].items():
            assert name in declared["dev"], f"setup.cfg: [dev] lacks {req} from [{extra}]"
            assert declared["dev"][name].specifier == req.specifier, (
                f"setup.cfg: {name} is {declared['dev'][name].specifier} in [dev] but {req.specifier} in [{extra}]"
            )


def test_bench_pins_satisfy_the_bench_extra():
    bench = _declared()["bench"]
    pins = _pins("requirements-bench.txt", "3.11")
    missing = sorted(set(bench) - set(pins))
    assert not missing, f"requirements-bench.txt does not pin {missing} (setup.cfg's bench extra)"
    for name, req in bench.items():
        version = _pinned_version(pins[name])
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements-bench.txt pins {name}=={version}, outside setup.cfg's {req}"
        )


def test_this_environment_has_the_pinned_versions():
    """A stale .venv (pins changed, setup not rerun) shows here rather than as odd failures."""
    python = ".".join(platform.python_version_tuple()[:2])
    wrong = []
    for name, pin in _pins("requirements-dev.txt", python).items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name} (not installed)")
            continue
        if have != _pinned_version(pin):
            wrong.append(f"{name} {have} (pinned {_pinned_version(pin)})")
    assert not wrong, f"installed versions differ from requirements-dev.txt: {wrong}; run bash .ci/setup.sh"
