"""The package's shape: sibling imports at the top of files, no import cycle, one lifecycle.

The import graph is read from the source (AST), so it shows the architecture as written. Every
sibling import is an edge: at the top of a file, inside module-level `if`/`try` blocks (an
`if __name__ == "__main__":` block too: `python -m llama_recipes.X` imports what it names) and inside
functions. A module that imports a sibling inside a function would hide an edge from a reader of
its top, so that is refused too (cli.py excepted: it is the top of the graph and dispatches to the
modes lazily, which keeps `--help` fast; its lazy imports are still edges).
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "llama_recipes"
LAZY_SIBLINGS_ALLOWED = {"llama_recipes.cli"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(every sibling module the file imports, anywhere in it; sibling imports made inside functions)."""
    tree = ast.parse(path.read_text())
    found, lazy = set(), []
    known = {module_name(p) for p in PKG.rglob("*.py")}

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out = [node.module]
            out += [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            return out
        return []

    for node in ast.walk(tree):  # the top, module-level if/try blocks, functions, classes
        found |= {t for t in targets(node) if t.startswith("llama_recipes")}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                lazy += [t for t in targets(sub) if t.startswith("llama_recipes")]
    # `from llama_recipes import x` names module x; `from llama_recipes.a import f` names module a
    resolved = {t for t in found if t in known}
    return resolved, lazy


def graph() -> dict[str, set[str]]:
    g = {}
    for p in PKG.rglob("*.py"):
        name = module_name(p)
        deps, _ = imports(p)
        g[name] = {d for d in deps if d != name and not name.startswith(d + ".")}  # a package's own __init__
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    g = graph()
    assert len(g) > 20
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_the_graph_sees_every_import(tmp_path):
    """The check can fail: imports under module-level if blocks (a `__main__` block too) and inside functions
    are edges, and a `python -m` block in a module that cli imports closes a circle."""
    f = tmp_path / "m.py"
    f.write_text("import os\nif os.environ.get('X'):\n    from llama_recipes import data\n"
                 "def g():\n    from llama_recipes import pipeline\n"
                 "if __name__ == '__main__':\n    from llama_recipes.cli import run_command\n")
    found, lazy = imports(f)
    assert {"llama_recipes.data", "llama_recipes.pipeline", "llama_recipes.cli"} <= found and lazy == [
        "llama_recipes", "llama_recipes.pipeline"]
    g = graph()
    g["llama_recipes.export"].add("llama_recipes.cli")  # what `if __name__ == "__main__"` in export.py once did
    assert set(find_cycle(g)) == {"llama_recipes.cli", "llama_recipes.export"}


def test_sibling_imports_are_at_the_top():
    lazy = {}
    for p in PKG.rglob("*.py"):
        name = module_name(p)
        found = imports(p)[1]
        if found and name not in LAZY_SIBLINGS_ALLOWED:
            lazy[name] = found
    assert lazy == {}


def test_one_training_entry():
    """pipeline.train is the only place a trainer's train() runs (heads included)."""
    def calls_train(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "train":
                owner = node.func.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                if name.endswith("trainer"):
                    return True
        return False

    assert [p.name for p in PKG.rglob("*.py") if calls_train(p)] == ["pipeline.py"]
