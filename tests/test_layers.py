"""The layer contract of docs/architecture.md, checked over the source's AST (issue #25, step 7).

Every module under ``src/conan_embedding`` is put in one layer, bottom to top:

    base (_io, runtime, progress, provenance, config) < data < modeling < encoding < builders
    < mining < losses < training < evaluation < reporting < serving < experiments < cli

and may import (at module level, inside a function, or under ``TYPE_CHECKING``) only from its
own layer or the ones below it. The few edges that still go up are listed in ``ALLOWED`` with
the reason and the step of issue #25 that removes them; the test fails on any other upward
edge, and also when an allowed edge is gone (delete it from the list: the list only shrinks).
No package is imported: the check reads files, so it runs in a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "conan_embedding"

LAYERS = (
    "base",
    "data",
    "modeling",
    "encoding",
    "builders",
    "mining",
    "losses",
    "training",
    "evaluation",
    "reporting",
    "serving",
    "experiments",
    "cli",
)

# top-level modules and packages of conan_embedding -> layer (data/ is split below)
TOP_LEVEL = {
    "__init__": "base",
    "_io": "base",
    "runtime": "base",
    "progress": "base",
    "provenance": "base",
    "config": "base",
    "data": "data",
    "modeling": "modeling",
    "encoding": "encoding",
    "builders": "builders",
    "mining": "mining",
    "losses": "losses",
    "training": "training",
    "evaluation": "evaluation",
    "reporting": "reporting",
    "serving": "serving",
    "experiments": "experiments",
    "toy": "experiments",  # fixtures for checks and tests; nothing in the library imports them
    "cli": "cli",
}
# data/ holds two layers today: schemas and access (data) and what writes training files
# (builders, which encode and so sit above encoding)
BUILDERS_IN_DATA = {"builders", "prepare"}

# (importer, imported) -> why it still goes up, and the step of issue #25 that removes it
ALLOWED: dict[tuple[str, str], str] = {
    (
        "conan_embedding.training.distributed",
        "conan_embedding.cli",
    ): "`python -m conan_embedding.training.distributed` (older torchrun lines) forwards to the "
    "CLI; goes with the train-cbb alias (step 5: `torchrun -m conan_embedding.cli train`)",
    (
        "conan_embedding.training.soft_mask_weak",
        "conan_embedding.reporting.card",
    ): "SoftMaskWeakProgram.finish renders the v2 model card and passes it to "
    "export_sentence_transformer(readme=...); step 5 renders it in the caller",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "base"
    head = parts[0]
    if head == "data" and len(parts) > 1 and parts[1] in BUILDERS_IN_DATA:
        return "builders"
    if head not in TOP_LEVEL:
        raise AssertionError(
            f"conan_embedding.{head} has no layer: add it to TOP_LEVEL in tests/test_layers.py "
            "and to docs/architecture.md"
        )
    return TOP_LEVEL[head]


def imports_of(path: Path) -> set[str]:
    """Every ``conan_embedding`` module ``path`` imports, wherever the import statement is."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target == "conan_embedding":  # `from conan_embedding import x`: x may be a module
                found.update(
                    f"conan_embedding.{a.name}"
                    if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                    else target
                    for a in node.names
                )
            else:
                found.add(target)
    return {m for m in found if m == "conan_embedding" or m.startswith("conan_embedding.")}


def upward_edges() -> dict[tuple[str, str], tuple[str, str]]:
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        low = LAYERS.index(layer_of(importer))
        for imported in imports_of(path):
            if LAYERS.index(layer_of(imported)) > low:
                edges[(importer, imported)] = (layer_of(importer), layer_of(imported))
    return edges


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        assert layer_of(module_name(path)) in LAYERS


def test_no_import_goes_up_a_layer():
    new = {edge: layers for edge, layers in upward_edges().items() if edge not in ALLOWED}
    assert not new, (
        "imports from a higher layer into a lower one:\n"
        + "\n".join(f"  {a} ({la}) -> {b} ({lb})" for (a, b), (la, lb) in sorted(new.items()))
        + "\nmove the code to the layer it belongs to (docs/architecture.md, CONTRIBUTING.md)"
    )


def test_the_allowlist_only_shrinks():
    gone = sorted(set(ALLOWED) - set(upward_edges()))
    assert not gone, "these allowed edges are gone; delete them from ALLOWED:\n" + "\n".join(
        f"  {a} -> {b}" for a, b in gone
    )


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """Module-level, function-level, relative and TYPE_CHECKING imports all count."""
    fake = tmp_path / "conan_embedding"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..training import engine\n"
        "if TYPE_CHECKING:\n    from conan_embedding.serving import server\n"
        "def f():\n    import conan_embedding.cli\n"
    )
    (fake / "data" / "y.py").write_text("from . import records\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert imports_of(fake / "data" / "x.py") == {
        "conan_embedding.training",
        "conan_embedding.serving",
        "conan_embedding.cli",
    }
    assert imports_of(fake / "data" / "y.py") == {"conan_embedding.data"}
    assert layer_of("conan_embedding.data.builders.filter") == "builders"
    assert layer_of("conan_embedding.data.records") == "data"
