"""docs/architecture.md cites only modules, files and names that exist.

Read from the source (AST, no imports): every `file.py`, `dir/`, `module.name`, `module/sub.name`,
`Class.attr` and bare identifier the page quotes in backticks or in its data-flow block must be
defined in llama_recipes/ (or be a path of the repository). A renamed function or a module that
moved fails here instead of leaving the page wrong (as `data.FORMATS` once did).
"""
import ast
import re
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "llama_recipes"
DOC = ROOT / "docs" / "architecture.md"
# Third-party names the page cites (not ours to check).
EXTERNAL = {"SFTConfig", "SFTTrainer", "Trainer", "PeftModel", "PeftModel.from_pretrained", "Literal"}
IDENT = re.compile(r"^[A-Za-z_]\w*$")


class Index:
    def __init__(self):
        self.modules: dict[str, Path] = {}
        self.names: dict[str, set[str]] = {}  # module -> top-level names
        self.classes: dict[str, dict[str, set[str]]] = {}  # module -> class -> names in its body
        for p in PKG.rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mod = ".".join(parts)
            tree = ast.parse(p.read_text())
            self.modules[mod] = p
            self.names[mod], self.classes[mod] = set(), {}
            for node in tree.body:
                self.names[mod] |= defined(node)
                if isinstance(node, ast.ClassDef):
                    self.classes[mod][node.name] = set().union(*(defined(n) for n in node.body), set())

    def everything(self) -> set[str]:
        out = set()
        for mod in self.modules:
            out |= self.names[mod]
            for body in self.classes[mod].values():
                out |= body
        return out

    def modules_named(self, dotted: str) -> list[str]:
        """Modules whose dotted name ends with `dotted` (`distributed` -> llama_recipes.runtime.distributed)."""
        return [m for m in self.modules if m == f"llama_recipes.{dotted}" or m.endswith("." + dotted)]

    def resolves(self, dotted: str) -> bool:
        parts = dotted.split(".")
        if parts[0] == "method":  # the Method object a recipe's method.name picks
            if self.resolves(".".join(["methods.base.Method", *parts[1:]])):
                return True
        if parts[0] == "objective":  # the Objective object a recipe's objective.name picks
            if self.resolves(".".join(["objectives.base.Objective", *parts[1:]])):
                return True
        for i in range(len(parts), 0, -1):
            for mod in self.modules_named(".".join(parts[:i])):
                rest = parts[i:]
                if not rest or rest == ["*"]:
                    return True
                if len(rest) == 1 and (rest[0] in self.names[mod] or
                                       any(rest[0] in body for body in self.classes[mod].values())):
                    return True
                if len(rest) == 2 and rest[1] in self.classes[mod].get(rest[0], ()):
                    return True
        return False


def defined(node) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return set()


def cited() -> set[str]:
    """What the page cites: backticked spans and the dotted names of its indented data-flow block."""
    text = DOC.read_text()
    spans = set(re.findall(r"`([^`\n]+)`", text))
    block = "\n".join(line for line in text.splitlines() if line.startswith("    "))
    block = re.sub(r"(\w+\.\w+)\s*/\s*(\w+)", r"\1/\2", block)  # `artifacts.read_run / load_base`
    spans |= set(re.findall(r"[A-Za-z_][\w/]*\.[\w.*/]*\w|[A-Za-z_][\w/]*\.\*|\b\w+\.py\b|\b\w+/(?=\s)", block))
    return spans


def problems() -> list[str]:
    idx = Index()
    known = idx.everything() | EXTERNAL
    bad = []
    for span in sorted(cited()):
        token = span.strip().rstrip(",")
        token = re.sub(r"\(.*$", "", token)  # `train(recipe)` -> train
        if token in EXTERNAL or not token or " " in token or ":" in token or token.startswith(("-", "$")) or \
                token.endswith((".json", ".png", ".md", ".safetensors", ".jinja")):  # files of a run's output dir
            continue
        if token.endswith((".py", "/", ".yaml")) or "/" in token.split(".")[0]:
            if token.endswith((".py", "/", ".yaml")):
                pattern = token.replace("<name>", "*")
                found = (list(PKG.glob(pattern)) or list(ROOT.glob(pattern)) or
                         (not token.startswith(("tests/", "recipes/")) and list(PKG.rglob(pattern.rstrip("/")))))
                if not found:
                    bad.append(f"{token}: no such file or directory")
                continue
        if "." in token or "/" in token:
            first = token.split(".")[0].replace("/", ".")
            if idx.modules_named(first) or first == "method":  # else a recipe key or a library's object
                bad += [f"{name}: not defined in llama_recipes" for name in expand(token) if not idx.resolves(name)]
            continue
        if IDENT.match(token) and token not in known:
            bad.append(f"{token}: not defined in llama_recipes")
    return bad


def expand(token: str) -> list[str]:
    """`runtime/distributed.setup` -> runtime.distributed.setup; `artifacts.detect/read_run/load` -> three names."""
    head, dot, tail = token.rpartition(".")
    if not dot:
        return [token.replace("/", ".")]
    if "/" in tail:  # alternatives after the last dot
        return [f"{head.replace('/', '.')}.{t}" for t in tail.split("/")]
    return [token.replace("/", ".")]


def test_architecture_doc_cites_what_exists():
    bad = problems()
    assert not bad, "docs/architecture.md cites what the code does not have:\n" + "\n".join(bad)


def test_the_check_finds_a_missing_name(tmp_path, monkeypatch):
    """The check can fail: a page citing data.FORMATS (which does not exist) is reported."""
    page = tmp_path / "architecture.md"
    page.write_text(DOC.read_text() + "\n`data.NO_SUCH_THING`, `artifacts.no_such_reader`, `no_such_module.py`\n")
    monkeypatch.setattr(__import__(__name__), "DOC", page)
    bad = problems()
    assert {"data.NO_SUCH_THING: not defined in llama_recipes",
            "artifacts.no_such_reader: not defined in llama_recipes",
            "no_such_module.py: no such file or directory"} <= set(bad), bad
