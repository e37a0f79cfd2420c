"""The layering rule, read from the source: the core (topocam/core) imports nothing of
Optuna, MLflow or Typer, nor any package that wraps it; wrappers import the core,
never the other way round. Parsed with ``ast``, so lazy imports inside functions
count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "topocam"
CORE_FORBIDDEN = ("optuna", "mlflow", "typer", "rich", "fastapi", "uvicorn", "topocam.search", "topocam.deploy",
                  "topocam.tracking", "topocam.report", "topocam.cli", "topocam.stores")
# who may import whom, beyond the core (which everyone may import)
# (the layers, bottom up: core < tracking < search < report < deploy < cli)
ALLOWED_UP = {
    "topocam.tracking": ("topocam.stores",),
    "topocam.search": ("topocam.tracking", "topocam.stores"),
    "topocam.report": ("topocam.search", "topocam.tracking", "topocam.stores"),
    "topocam.deploy": ("topocam.search", "topocam.tracking", "topocam.stores"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import figures` imports a module
    return out


def _hits(mods: set[str], prefixes) -> list[str]:
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_core_imports_no_wrapper():
    files = sorted((PACKAGE / "core").rglob("*.py"))
    assert len(files) >= 10, "the core package moved: update this test"
    bad = {str(f.relative_to(PACKAGE)): _hits(imports_of(f), CORE_FORBIDDEN) for f in files}
    assert {f: m for f, m in bad.items() if m} == {}


def test_wrappers_import_only_downwards():
    """search, tracking, report and deploy import the core and what ALLOWED_UP lists; the CLI may import anything."""
    layers = ("topocam.search", "topocam.tracking", "topocam.report", "topocam.deploy")
    bad = {}
    for layer in layers:
        others = [o for o in layers + ("topocam.cli",) if o != layer and o not in ALLOWED_UP.get(layer, ())]
        for f in sorted((PACKAGE / layer.split(".")[1]).rglob("*.py")):
            hits = _hits(imports_of(f), others)
            if hits:
                bad[str(f.relative_to(PACKAGE))] = hits
    assert bad == {}


def test_the_rule_can_fail(tmp_path):
    """The parser sees a lazy, relative import of a wrapper inside a function."""
    fake = PACKAGE / "core" / "_probe_layers.py"
    try:
        fake.write_text("def f():\n    from ..search import space\n    import mlflow\n")
        assert _hits(imports_of(fake), CORE_FORBIDDEN) == ["mlflow", "topocam.search", "topocam.search.space"]
    finally:
        fake.unlink()
