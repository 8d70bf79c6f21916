"""`llava/` stands without the plugin: no module of it imports `aligntI_patch` (Align-TI reaches the demo
through the `llava.visual_focus` entry point instead)."""

import ast
from pathlib import Path

LLAVA = Path(__file__).resolve().parents[1] / "llava"


def test_llava_imports_nothing_from_aligntI_patch():
    offenders = []
    for path in sorted(LLAVA.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(LLAVA.parent)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] == "aligntI_patch"]
    assert not offenders, offenders
