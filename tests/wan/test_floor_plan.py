"""The floor plan of library/wan: no import circles among its modules (function-level imports count) and
no module over 400 lines but the one DiT file, `model.py`. The graph walker is the one
tests/data/test_import_graph.py uses for library/data, prep and registry."""

from __future__ import annotations

from tests.data.test_import_graph import REPO, _cycle, _imports, _module_name

WAN = REPO / "library" / "wan"
LONG_ALLOWED = {"model.py"}  # the self-contained DiT (DESIGN.md, Models)


def _wan_graph() -> dict[str, set[str]]:
    files = sorted(p for p in WAN.glob("*.py") if p.name != "__init__.py")
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in files}


def test_the_graph_sees_wan_imports():
    graph = _wan_graph()
    assert "library.wan.fp8" in graph["library.wan.loading"]  # a module-level `from .fp8 import`
    assert "library.wan.text_encoder" in graph["library.wan.loading"]  # a function-level import
    assert "library.wan.vae_blocks" in graph["library.wan.vae22"]


def test_no_import_circles_in_wan():
    graph = _wan_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_fp8_stands_alone():
    """The fp8 format and layer import nothing else of library/wan; fp8 loading builds on them."""
    assert _wan_graph()["library.wan.fp8"] == set()


def test_wan_modules_stay_under_400_lines():
    long = {p.name: n for p in WAN.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert set(long) <= LONG_ALLOWED, long
