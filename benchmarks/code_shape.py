"""The shape of the code in figures: the measures docs/ARCHITECTURE.md promises to keep small.

    python -m benchmarks.code_shape [ROOT]

Prints one JSON object: task branches outside the task module (code that asks a task's name or its
number of outputs instead of asking the task), imports inside functions (each should keep TensorFlow
out of a light process), functions over 80 lines, and the largest module, over cxr_core/ and pages/.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

TASK_BRANCH = re.compile(r"""["']subtype["']|\bmulticlass\b|n_outputs\s*[<>=!]""")


def _sources(root: Path) -> list[Path]:
    return sorted([*(root / "cxr_core").rglob("*.py"), *(root / "pages").rglob("*.py"), root / "Home.py"])


def measure(root: Path) -> dict:
    branches: dict[str, int] = {}
    inner_imports = 0
    long_functions: list[str] = []
    sizes: dict[str, int] = {}
    for path in _sources(root):
        rel = str(path.relative_to(root))
        text = path.read_text(encoding="utf-8")
        sizes[rel] = text.count("\n")
        tree = ast.parse(text)
        if not rel.endswith(("core/tasks.py", "core/labels.py")):
            tests = [n.test if isinstance(n, (ast.If, ast.IfExp, ast.While)) else n for n in ast.walk(tree)
                     if isinstance(n, (ast.If, ast.IfExp, ast.While, ast.Compare))]
            hits = len({n.lineno for n in tests if TASK_BRANCH.search(ast.get_source_segment(text, n) or "")})
            if hits:
                branches[rel] = hits
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner_imports += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(node))
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{rel}:{node.name} ({length})")
    largest = max(sizes, key=sizes.get)
    return {"task_branches": sum(branches.values()), "task_branch_files": len(branches),
            "imports_inside_functions": inner_imports, "functions_over_80_lines": len(long_functions),
            "long_functions": long_functions, "largest_module": f"{largest} ({sizes[largest]} lines)",
            "modules": len(sizes), "lines": sum(sizes.values())}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]),
                     indent=1))
