"""The shape of the code: cxr_core in subpackages by role, imports that only go down the layers, no import
cycle (cxr_core and pages/ui), a run's file names in one module, the core without Streamlit, TensorFlow only
in the engine and never in a page."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "cxr_core"
PAGES = [ROOT / "Home.py", *sorted((ROOT / "pages").rglob("*.py"))]
#: The subpackages from the bottom up: a module imports only from its own layer or those below it.
LAYERS = ("core", "io", "data", "runs", "engine", "inference", "evaluation", "hosting", "teaching")
#: Imports that go up a layer, each inside a function and each for a reason.
UPWARD = {
    # The shortcut check's feature probe runs the frozen backbone: only when a person asks for the probe.
    ("cxr_core.data.shortcuts", "cxr_core.engine.features"),
}
HEAVY = ("tensorflow", "keras")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Dotted names of what ``path`` imports (``from a.b import c`` gives ``a.b.c`` and ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: use absolute imports"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _core_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in CORE.rglob("*.py")}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_subpackage_by_role():
    loose = sorted(m for m in _core_modules() if m.count(".") == 1 and m.split(".")[1] not in LAYERS)
    assert loose == ["cxr_core.__main__", "cxr_core.cli"]
    assert {p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)
    assert (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8").count("cxr_core/") >= len(LAYERS)


def test_imports_only_go_down_the_layers():
    modules = _core_modules()
    upward = set()
    for name, path in modules.items():
        here = _layer(name)
        if here is None:
            continue
        for target in _imports(path) & set(modules):
            there = _layer(target)
            if there is not None and there > here:
                upward.add((name, target))
    assert upward == UPWARD


def _graph(paths: dict[str, Path]) -> dict[str, set[str]]:
    return {name: _imports(path) & set(paths) - {name} for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None
    return [c for c in (cycle_from(m) for m in sorted(graph)) if c]


def test_no_import_cycle_in_cxr_core_or_the_pages():
    graph = _graph(_core_modules())
    assert graph["cxr_core.inference.predictor"], "the graph was not read"
    assert not _cycles(graph), _cycles(graph)[:3]
    ui = {_module_name(p): p for p in PAGES}
    ui_graph = _graph(ui)
    assert not _cycles(ui_graph), _cycles(ui_graph)[:3]


def _string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_a_runs_file_names_are_spelt_in_one_module():
    names = {"config.json", "metrics.json", "status.json", "model.keras", "model.tflite", "model.tflite.json",
             "history.csv", "split.csv", "progress.jsonl", "cancel.request"}
    offenders = {}
    for path in [*CORE.rglob("*.py"), *PAGES]:
        if path.name == "run_folder.py":
            continue
        spelt = names & _string_literals(path)
        if spelt:
            offenders[str(path.relative_to(ROOT))] = sorted(spelt)
    assert not offenders
    assert names <= _string_literals(CORE / "runs" / "run_folder.py")


def test_tensorflow_only_in_the_engine_streamlit_never_in_the_core():
    for name, path in _core_modules().items():
        text = path.read_text(encoding="utf-8")
        assert "import streamlit" not in text and "from streamlit" not in text, path
        heavy = {m for m in _imports(path, top_level_only=True) if m.split(".")[0] in HEAVY}
        if _layer(name) != LAYERS.index("engine"):
            assert not heavy, f"{name} imports {heavy} at module level"


def _engine_modules_that_load_tensorflow() -> set[str]:
    """The engine modules that import TensorFlow or Keras at module level, directly or through another."""
    engine = {name: path for name, path in _core_modules().items() if _layer(name) == LAYERS.index("engine")}
    top = {name: _imports(path, top_level_only=True) for name, path in engine.items()}
    heavy = {name for name, found in top.items() if any(m.split(".")[0] in HEAVY for m in found)}
    while True:
        more = {name for name, found in top.items() if found & heavy} - heavy
        if not more:
            return heavy
        heavy |= more


def test_outside_the_engine_tensorflow_modules_are_imported_inside_functions_only():
    """A light process (the app with a LiteRT export, the CLI's help) imports no engine module that loads
    TensorFlow: outside the engine such a module is imported inside the function that needs it."""
    heavy = _engine_modules_that_load_tensorflow()
    assert {"cxr_core.engine.model", "cxr_core.engine.keras_runner", "cxr_core.engine.export"} <= heavy
    assert "cxr_core.engine.litert" not in heavy  # the export's format, read by every predictor
    for name, path in _core_modules().items():
        if _layer(name) != LAYERS.index("engine"):
            assert not _imports(path, top_level_only=True) & heavy, name


def test_pages_never_import_tensorflow_nor_the_engine_at_module_level():
    heavy_engine = _engine_modules_that_load_tensorflow()
    for path in PAGES:
        everywhere = _imports(path)
        assert not {m for m in everywhere if m.split(".")[0] in HEAVY}, path
        assert not everywhere & heavy_engine, path


def test_the_run_folder_layout_is_written_once_in_its_module():
    from cxr_core.runs import run_folder

    names = {value for key, value in vars(run_folder).items() if key.endswith(("_FILE", "_DIR"))}
    assert len(names) >= 14
    listed = {line.split()[0].rstrip("/") for line in run_folder.__doc__.splitlines() if line.startswith("    ")}
    assert names <= listed, names - listed
    for doc in ("README.md", "docs/ARCHITECTURE.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert "progress.jsonl    one JSON line" not in text and "run_folder.py" in text, doc


def test_an_installed_package_holds_every_subpackage():
    import tomllib

    from setuptools import find_packages

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = set(find_packages(str(ROOT), **settings["packages"]["find"]))
    assert found == {"cxr_core", *(f"cxr_core.{layer}" for layer in LAYERS)}
