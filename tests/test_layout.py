"""The floor plan, checked from the code's own imports (every import counts, also those inside functions):
no import circle among the project's modules, packages import only downwards, `networks` is plain
PyTorch, `library.sampling` never reaches into `library.training`, and nothing in the library imports an
entry script or a tool. The allowed directions are the table below; README "How the code is laid out"
and each package's `__init__` docstring say the same in words."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

from tests.helpers import REPO

# Bottom to top: a package may import packages on lower rows only (and itself). Peers on one row may not
# import each other.
LAYERS = (
    ("library.errors",),  # the one user-error type and the command-line wrapper; imports nothing of the project
    ("library.wan", "library.guide"),  # the model family; the practitioner guide's tables
    ("library.runtime",),  # memory / speed features that run a model (fp8, block swap, offload, compile)
    ("library.config",),  # the typed training config
    ("networks",),  # LoRA modules and LoRA file formats (plain PyTorch: see NETWORKS_MAY_IMPORT)
    ("library.prep",),  # dataset preparation (filters, clips, captions)
    ("library.data",),  # dataset TOML, media decoding, buckets, caches
    ("library.sampling",),  # schedulers, the denoising loop, generation
    ("library.training",),  # the loop, the engines, checkpoints, the planner
    ("library.evaluation", "library.registry", "library.lora_tools"),  # judging runs, versioning, LoRA x DiT files
    ("library.diagnostics",),  # LoRA file diagnostics (reads registry hashes)
)
NETWORKS_MAY_IMPORT = ("library.errors",)  # of `library`, only the user-error type (which imports nothing)
ENTRY_POINTS = ("tools", "finetune", "train_network_wan", "generate_video_wan", "demo",
                "wan_train_network", "wan_cache_latents", "wan_cache_text_encoder_outputs", "wan_generate_video")
# inside library.training: the engines sit below everything else there (they know nothing of the loop,
# checkpoints or planning); these are the only training modules they may use
ENGINE_MAY_IMPORT = ("library.training.engines", "library.training.seeding", "library.training.dtypes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def project_modules() -> dict[str, Path]:
    files = [*(REPO / "library").rglob("*.py"), *(REPO / "networks").rglob("*.py")]
    return {_module_name(p): p for p in files}


def _resolve(module: str | None, level: int, current: str, is_package: bool) -> str:
    if not level:
        return module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


@lru_cache(maxsize=None)
def imports_of(name: str) -> frozenset[str]:
    """Every project module `name` imports, at module level or inside functions."""
    modules = project_modules()
    path = modules[name]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module, node.level, name, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)  # `from pkg import module` imports the module
    return frozenset(m for m in found if m in modules and m != name)


def all_imports_with_entries(name: str) -> set[str]:
    """Like imports_of, plus imports of top-level names outside the library (entry scripts, tools)."""
    tree = ast.parse(project_modules()[name].read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "library" and len(parts) > 1 else parts[0]


def layer_of(package: str) -> int:
    for i, row in enumerate(LAYERS):
        if package in row:
            return i
    raise AssertionError(f"package {package} is not in the LAYERS table of tests/test_layout.py: give it a row")


def find_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: imports_of(m) for m in project_modules()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_circles():
    assert find_cycles() == []


def test_packages_import_only_downwards():
    wrong = []
    for module in project_modules():
        mine = package_of(module)
        for target in imports_of(module):
            theirs = package_of(target)
            if theirs != mine and layer_of(theirs) >= layer_of(mine):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_networks_is_plain_pytorch():
    wrong = [f"{m} -> {t}" for m in project_modules() if package_of(m) == "networks"
             for t in imports_of(m) if package_of(t) != "networks" and package_of(t) not in NETWORKS_MAY_IMPORT]
    assert wrong == []


def test_sampling_never_imports_training():
    wrong = [f"{m} -> {t}" for m in project_modules() if m.startswith("library.sampling")
             for t in imports_of(m) if t.startswith("library.training")]
    assert wrong == []


def test_engines_know_nothing_of_the_loop():
    wrong = [f"{m} -> {t}" for m in project_modules() if m.startswith("library.training.engines")
             for t in imports_of(m) if t.startswith("library.training") and not t.startswith(ENGINE_MAY_IMPORT)]
    assert wrong == []


def test_library_never_imports_entry_scripts_or_tools():
    wrong = [f"{m} -> {n}" for m in project_modules() for n in all_imports_with_entries(m) if n in ENTRY_POINTS]
    assert wrong == []


@pytest.mark.parametrize("package", sorted({package_of(m) for m in project_modules()} - {"library"}))
def test_each_package_says_what_it_is_for_and_may_import(package):
    init = project_modules().get(package)
    if init is None or init.name != "__init__.py":
        pytest.skip(f"{package} is a single module")
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    assert "import" in doc.lower(), f"{init}: the docstring must say what the package is for and what it may import"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks can fail: two modules importing each other inside functions, and wan importing training."""
    fake = {"library.wan.a": tmp_path / "a.py", "library.wan.b": tmp_path / "b.py",
            "library.training.t": tmp_path / "t.py"}
    fake["library.wan.a"].write_text("def f():\n    from library.wan import b\n")
    fake["library.wan.b"].write_text("from library.wan.a import f\nfrom library.training import t\n")
    fake["library.training.t"].write_text("")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "project_modules", lambda: fake)
    imports_of.cache_clear()
    try:
        assert find_cycles() == [["library.wan.a", "library.wan.b"]]
        assert "library.training.t" in imports_of("library.wan.b")
        assert layer_of(package_of("library.training.t")) > layer_of(package_of("library.wan.b"))
    finally:
        imports_of.cache_clear()


LONG_ALLOWED = {"library/wan/model.py"}  # the one self-contained DiT file (DESIGN.md, Models)


def test_no_module_over_400_lines_but_the_dit():
    shipped = [*(REPO / "library").rglob("*.py"), *(REPO / "networks").rglob("*.py"), *(REPO / "tools").glob("*.py"),
               *(REPO / "finetune").glob("*.py"), *REPO.glob("*.py")]
    long = {p.relative_to(REPO).as_posix(): n for p in shipped
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert set(long) <= LONG_ALLOWED, long


def test_fp8_format_stands_alone():
    """The fp8 format, maths and layer import nothing else of the project; fp8 loading builds on them."""
    assert imports_of("library.wan.fp8") == frozenset()
