"""The test environment is the pinned one: a machine that reuses older (or newer) test tools than
requirements-test.txt names could pass or fail for reasons a fresh install does not share."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pytest

from tests.helpers import REPO


def pinned_test_tools() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements-test.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, sep, pinned = requirement.partition("==")
            assert sep, f"requirements-test.txt: {requirement!r} is not pinned with =="
            pins[name.strip()] = pinned.strip()
    return pins


def test_the_test_extra_installs_the_pinned_tools():
    """What `pip install -e ".[test]"` recorded for the extra is the pinned list (setup.py reads the file)."""
    from importlib.metadata import requires

    extra = sorted(r.split(";")[0].replace(" ", "") for r in requires("wan-trainer") or [] if 'extra == "test"' in r)
    assert extra == sorted(f"{name}=={pinned}" for name, pinned in pinned_test_tools().items())


@pytest.mark.parametrize("name", sorted(pinned_test_tools()))
def test_installed_test_tool_is_the_pinned_version(name):
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is not installed: run pip install -e \".[test]\"")
    assert installed == pinned_test_tools()[name], (
        f"{name} {installed} is installed, requirements-test.txt pins {pinned_test_tools()[name]}: "
        "run pip install -e \".[test]\"")
