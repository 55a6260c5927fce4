"""The shape of the code: no import cycle in cxr_core, a run's file names in one module, the core
without Streamlit, the pages without TensorFlow."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "cxr_core"
PAGES = [ROOT / "Home.py", *sorted((ROOT / "pages").rglob("*.py"))]


def _core_imports(path: Path) -> set[str]:
    """cxr_core modules that ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("cxr_core"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "cxr_core" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_no_import_cycle_in_cxr_core():
    modules = {p.stem for p in CORE.glob("*.py")} - {"__init__", "__main__"}
    graph = {m: _core_imports(CORE / f"{m}.py") & modules for m in modules}
    assert graph["litert"] and graph["predict"], "the graph was not read"

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

    cycles = [c for c in (cycle_from(m) for m in sorted(modules)) if c]
    assert not cycles, f"import cycles: {cycles[:3]}"


def _string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_a_runs_file_names_are_spelt_in_one_module():
    names = {"config.json", "metrics.json", "status.json", "model.keras", "model.tflite", "model.tflite.json",
             "history.csv", "split.csv", "progress.jsonl", "cancel.request"}
    offenders = {}
    for path in [*CORE.glob("*.py"), *PAGES]:
        if path.name == "run_folder.py":
            continue
        spelt = names & _string_literals(path)
        if spelt:
            offenders[str(path.relative_to(ROOT))] = sorted(spelt)
    assert not offenders
    assert names <= _string_literals(CORE / "run_folder.py")


def test_the_core_never_imports_streamlit_and_pages_never_import_tensorflow():
    for path in CORE.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import streamlit" not in text and "from streamlit" not in text, path
    for path in PAGES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] in ("tensorflow", "keras") for m in mods), path
                # cxr_core.train imports TensorFlow; pages use cxr_core.plan for estimates.
                assert not any(m in ("cxr_core.train", "cxr_core.model", "cxr_core.features") for m in mods), path
                if isinstance(node, ast.ImportFrom) and node.module == "cxr_core":
                    assert not {a.name for a in node.names} & {"train", "model", "features"}, path
