"""The package's import graph: the CLI is the top layer, no private name crosses a module boundary,
and imports sit at module top unless the dependency is optional (issue 21)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "tinyllm"
# what a module may import inside a function, because an install may lack it: torch (the training
# extras) and the modules built on it, fastapi/uvicorn (the serve extras), tomllib (Python 3.11+), and
# tinyllm.runtime in the package's __init__ (the compiled extension, which a fresh checkout has not built)
OPTIONAL = {"torch", "fastapi", "uvicorn", "starlette", "matplotlib", "tomllib", "tinyllm.model", "tinyllm.train",
            "tinyllm.formats.checkpoint", "tinyllm.formats.verify", "tinyllm.server", "tinyllm.eval",
            "tinyllm.runtime"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path, ast.parse(path.read_text(encoding="utf-8"))


def _imported(module: str, path: Path, node) -> list[tuple[str, list[str]]]:
    """(absolute module, names) of one import statement."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [(base, [a.name for a in node.names])]


def _imports(tree):
    """(import node, whether it sits inside a function) for every import."""
    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, inside
            yield from walk(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    yield from walk(tree, False)


def test_nothing_imports_the_cli():
    offenders = [f"{m}:{node.lineno}" for m, path, tree in _modules() if m != "tinyllm.cli"
                 for node, _ in _imports(tree) for target, _ in _imported(m, path, node)
                 if target == "tinyllm.cli" or (target == "tinyllm" and "cli" in _imported(m, path, node)[0][1])]
    assert offenders == []


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for m, path, tree in _modules():
        for node, _ in _imports(tree):
            for target, names in _imported(m, path, node):
                if target.startswith("tinyllm") and target != m:
                    offenders += [f"{m}:{node.lineno} {target}.{n}" for n in names
                                  if n.startswith("_") and n != "_runtime" and not n.startswith("__")]
    assert offenders == []


def test_imports_sit_at_module_top_unless_the_dependency_is_optional():
    offenders = []
    for m, path, tree in _modules():
        for node, inside in _imports(tree):
            if not inside:
                continue
            for target, names in _imported(m, path, node):
                wanted = [target] + [f"{target}.{n}" for n in names]
                if not any(w == o or w.startswith(o + ".") for w in wanted for o in OPTIONAL):
                    offenders.append(f"{m}:{node.lineno} {target}")
    assert offenders == [], f"{len(offenders)} imports inside functions"
