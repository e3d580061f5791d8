"""Every command the docs quote runs: README.md and docs/*.md, each ```bash (sh, shell) block.

A block runs with real bash (variables, quoting and line continuations as a user's shell has them)
in a sandbox: a temporary directory holding links to the repository's files, its own outputs/, and
a PATH whose `python`, `accelerate`, `torchrun`, `llama-recipes`, `make`, `pip`, ... are
tests/doc_commands_shim.py. The shim runs each command, or the check that stands for it in the fast
suite (`--validate`, the launch checks of a recipe/config pair, the real argument parser), or skips
it with a reason; on the slow tier (`make test-all`) training, eval, dry-run, export and launch lines
run for real on tiny stand-ins. Each line of a block must have been run, checked or skipped with a
reason: a command the shim has no rule for fails here, so a new doc's commands are checked too.

Writing docs: a ```bash block holds commands only (output goes in a ```text block). Placeholders
in capitals (RECIPE, DIR, CONFIG) stand for a shipped example (PLACEHOLDERS below); a synopsis line
with `[--optional]` arguments is reported as skipped. A block that must not run is preceded by
`<!-- doc-commands: skip REASON -->`.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"bash", "sh", "shell"}
SHIM = ROOT / "tests" / "doc_commands_shim.py"
SHIMMED = ["python", "python3", "accelerate", "torchrun", "llama-recipes", "make", "pip", "huggingface-cli", "hf",
           "tensorboard", "nvidia-smi"]
SHELL = {"cp", "cat", "ls", "mkdir", "echo", "cd", "export", "head", "tail", "jq", "grep", "rm", "test", "true"}
PLACEHOLDERS = {  # word in the docs -> what the test uses (placeholders are whole words)
    "RECIPE.yaml": "recipes/demo/tiny_lora.yaml", "RECIPE": "recipes/demo/tiny_lora.yaml",
    "accelerate_configs/CONFIG.yaml": "accelerate_configs/fsdp_4gpu.yaml", "CONFIG": "accelerate_configs/fsdp_4gpu.yaml",
    "ACCEL.yaml": "accelerate_configs/fsdp_4gpu.yaml",
    "DIR": "outputs/demo_tiny_lora", "OUTPUT_DIR": "outputs/demo_tiny_lora",
}
SKIP = re.compile(r"<!--\s*doc-commands:\s*skip\s+(.+?)\s*-->")
LINKED = ["recipes", "llama_recipes", "accelerate_configs", "run_recipe.py", "scripts", "tests", "bench", "docs",
          "Makefile", "setup.cfg", "pyproject.toml"]


class Block:
    def __init__(self, doc: Path, start: int, lines: list[tuple[int, str]], skip: str | None):
        self.doc, self.start, self.lines, self.skip = doc, start, lines, skip  # lines: (line number, command)

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.start}"


def blocks(paths=DOCS) -> list[Block]:
    """The command blocks of the docs; continuation lines joined, comment-only lines dropped."""
    out = []
    for doc in paths:
        text = doc.read_text().splitlines()
        i = 0
        while i < len(text):
            m = re.match(r"^\s*```(\w*)\s*$", text[i])
            if not m:
                i += 1
                continue
            lang, start = m.group(1), i + 1
            j = i + 1
            while j < len(text) and not re.match(r"^\s*```\s*$", text[j]):
                j += 1
            if lang in LANGS:
                prev = next((text[k] for k in range(i - 1, -1, -1) if text[k].strip()), "")
                skip = SKIP.search(prev)
                lines, buf, first = [], "", None
                for n in range(i + 1, j):
                    line = text[n]
                    if first is None:
                        first = n + 1
                    if line.rstrip().endswith("\\"):
                        buf += line.rstrip()[:-1] + " "
                        continue
                    buf += line
                    if buf.strip() and not buf.strip().startswith("#"):
                        lines.append((first, buf.strip()))
                    buf, first = "", None
                out.append(Block(doc, start, lines, skip.group(1) if skip else None))
            i = j + 1
    return out


def without_substitutions(line: str) -> str:
    """The line with each `$( ... )` replaced by a word (what it calls runs through the shims anyway)."""
    out, depth = [], 0
    i = 0
    while i < len(line):
        if line.startswith("$(", i):
            depth += 1
            i += 2
            continue
        if depth and line[i] == "(":
            depth += 1
        elif depth and line[i] == ")":
            depth -= 1
            if depth == 0:
                out.append("SUBST")
        elif not depth:
            out.append(line[i])
        i += 1
    return "".join(out)


def programs(line: str) -> list[str]:
    """The programs a command line calls (assignment-only parts have none)."""
    lex = shlex.shlex(without_substitutions(line), posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    out, at_start = [], True
    for tok in lex:
        if tok in (";", "&&", "||", "|", "&"):
            at_start = True
            continue
        if at_start:
            if re.match(r"^[A-Za-z_]\w*=", tok):
                continue
            out.append(tok)
            at_start = False
    return out


def substitute(line: str, sandbox: Path) -> str:
    for word, value in PLACEHOLDERS.items():
        line = re.sub(rf"(?<![\w/.$-]){re.escape(word)}(?![\w.-])", value, line)
    return line.replace("/tmp/", f"{sandbox}/tmp/")


def make_sandbox(tmp: Path) -> tuple[Path, dict]:
    box = tmp / "sandbox"
    (box / "bin").mkdir(parents=True)
    (box / "tmp").mkdir()
    for name in LINKED:
        (box / name).symlink_to(ROOT / name)
    for prog in SHIMMED:
        w = box / "bin" / prog
        w.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(SHIM))} {prog} "$@"\n')
        w.chmod(0o755)
    env = {**os.environ, "PATH": f"{box / 'bin'}:/usr/bin:/bin", "DOC_SANDBOX": str(box),
           "DOC_LOG": str(tmp / "log.jsonl"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    return box, env


def run_block(block: Block, tmp: Path, tier: str) -> list[dict]:
    """Run a block; returns one entry per command line: line, text, what was done (and why)."""
    box, env = make_sandbox(tmp)
    env["DOC_TIER"] = tier
    report = []
    if block.skip:
        return [{"line": n, "command": c, "done": "skipped", "why": block.skip} for n, c in block.lines]
    script = ["set -e"]
    plan = {}
    for n, line in block.lines:
        cmd = substitute(line, box)
        progs = programs(cmd)
        unknown = [p for p in progs if p not in SHIMMED and p not in SHELL]
        assert not unknown, (f"{block.doc.name}:{n}: `{line}` calls {unknown}: tests/test_doc_commands.py has no rule "
                             "for it (add one to the shim, or SHELL), or put the block under ```text")
        if "[--" in line:
            plan[n] = {"line": n, "command": line, "done": "skipped", "why": "a synopsis ([--optional] arguments)"}
            continue
        plan[n] = {"line": n, "command": line, "done": None, "why": "", "shell_only": not any(p in SHIMMED for p in progs)}
        script += [f"export DOC_LINE={n}", cmd]
    r = subprocess.run(["bash", "-c", "\n".join(script)], cwd=box, env=env, capture_output=True, text=True,
                       timeout=3000)
    log = [json.loads(x) for x in Path(env["DOC_LOG"]).read_text().splitlines()] if Path(env["DOC_LOG"]).exists() else []
    assert r.returncode == 0, (f"{block.id}: a command failed (exit {r.returncode}); last: "
                               f"{log[-1] if log else '-'}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    for entry in log:
        if entry.get("pair") and entry["pair"][0]:
            check_pair(*entry["pair"], box)
        p = plan[entry["line"]]
        p["done"] = p["done"] or entry["action"]
        p["why"] = p["why"] or entry["why"]
    for p in plan.values():
        if p.get("shell_only"):
            p["done"] = p["done"] or "ran (shell)"
        assert p["done"], f"{block.doc.name}:{p['line']}: `{p['command']}` did not run any command"
        report.append(p)
    return report


def check_pair(config: str, recipe: str, box: Path) -> None:
    """A launch line's recipe/config pair passes every launch-time check: tests/test_launch_pairs.py
    checks each pair the docs name literally; a pair written another way is checked here."""
    from test_launch_pairs import documented_pairs

    c, r = Path(config), Path(recipe)
    if c.parent.name == "accelerate_configs" and r.parts[:1] == ("recipes",) and \
            (c.stem, str(r.relative_to("recipes").with_suffix(""))) in documented_pairs():
        return
    from llama_recipes import launchcheck
    from llama_recipes.schema import load_recipe

    launchcheck.check(load_recipe(box / recipe), str(box / config), recipe)


ALL = blocks()


def test_docs_have_command_blocks():
    """The README's commands are blocks this test reads (a renamed fence would silently drop them)."""
    readme = [b for b in ALL if b.doc.name == "README.md"]
    assert len(readme) >= 4 and sum(len(b.lines) for b in readme) >= 12
    assert any("make demo" in c for b in readme for _, c in b.lines)


@pytest.mark.parametrize("block", ALL, ids=lambda b: b.id)
def test_doc_block_commands(block, tmp_path):
    report = run_block(block, tmp_path, "default")
    for p in report:
        print(f"{block.doc.name}:{p['line']}: {p['done']}{': ' + p['why'] if p['why'] else ''}  | {p['command']}")


@pytest.mark.slow
@pytest.mark.parametrize("block", ALL, ids=lambda b: b.id)
def test_doc_block_commands_for_real(block, tmp_path):
    report = run_block(block, tmp_path, "slow")
    for p in report:
        print(f"{block.doc.name}:{p['line']}: {p['done']}{': ' + p['why'] if p['why'] else ''}  | {p['command']}")
