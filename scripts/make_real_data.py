"""Write the real-text datasets of the SmolLM2 demos from Python's own standard-library docstrings.

Nobody on this project wrote these texts: they are the docstrings of CPython 3.11's standard
library (PSF License), as `inspect.getdoc` returns them. They are bundled (about 0.5 MB) rather than
extracted at first use because docstrings change between Python versions, and the README's
before/after numbers must not depend on which Python runs the demo.

    llama_recipes/assets/data/pydoc_package/   which package documents this? (6 labels)
        train.jsonl / eval.jsonl    alpaca rows: instruction, input (the docstring), output (the package)
        classify_train.jsonl / classify_eval.jsonl   the same rows as {text, label}
    llama_recipes/assets/data/pydoc_summary/   chat: write the one-line summary of a documented function
        train.jsonl / eval.jsonl    {"messages": [system, user (name + docstring body), assistant (summary)]}

In pydoc_package the package's own name (and its obvious variants) is masked as "___" in the
text, so the answer is not a word of the question. Regenerate (same Python minor version gives
the same files):  python scripts/make_real_data.py
"""
import importlib
import inspect
import json
import pkgutil
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "llama_recipes" / "assets" / "data"
LABELS = ["asyncio", "decimal", "email", "logging", "tkinter", "xml"]
PER_LABEL = 90  # rows per package (70 train / 20 eval)
MASK = {  # words that name the package, masked in its docstrings
    "asyncio": r"asyncio|async|await|coroutines?|event loop",
    "decimal": r"decimals?",
    "email": r"e-?mails?",
    "logging": r"logging|loggers?|logs?",
    "tkinter": r"tkinter|tk|tcl",
    "xml": r"xml",
}
SUMMARY_PACKAGES = ["argparse", "calendar", "collections", "csv", "datetime", "difflib", "fractions", "ftplib",
                    "gzip", "heapq", "inspect", "ipaddress", "itertools", "pathlib", "pickle", "queue", "shutil",
                    "smtplib", "sqlite3", "ssl", "statistics", "string", "tarfile", "textwrap", "threading",
                    "tokenize", "unittest", "urllib", "zipfile", "zoneinfo", "asyncio", "decimal", "email", "http",
                    "importlib", "logging", "multiprocessing", "tkinter", "xml", "concurrent", "ctypes", "json",
                    "socket", "subprocess", "random", "os", "typing", "functools", "contextlib", "dataclasses",
                    "enum", "configparser", "codecs", "locale", "mailbox", "imaplib", "poplib", "nntplib",
                    "telnetlib", "turtle", "wave", "sunau", "aifc", "optparse", "getopt", "pydoc", "doctest",
                    "pdb", "trace", "timeit", "cProfile", "profile", "pstats", "sched", "selectors", "signal"]
SUMMARY_ROWS = (540, 60)  # train, eval
SYSTEM = "You are a concise technical writer."
INSTRUCTION = ("Which Python standard-library package does this documentation come from: asyncio, decimal, email, "
               "logging, tkinter or xml? (The package's own name is masked as ___.) Answer with the package name.")


def submodules(top: str):
    mod = importlib.import_module(top)
    yield mod
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), top + "."):
        if "test" in info.name or "__main__" in info.name or "idle" in info.name:
            continue
        try:
            yield importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - optional modules (tkinter, ...) missing here
            continue


def documented(top: str):
    """(qualified name, docstring) of the public classes, functions and methods of a package."""
    for mod in submodules(top):
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if not str(getattr(obj, "__module__", "") or "").startswith(top):
                continue
            members = [(f"{mod.__name__}.{name}", obj)]
            if inspect.isclass(obj):
                members += [(f"{mod.__name__}.{name}.{a}", b) for a, b in sorted(vars(obj).items())
                            if not a.startswith("_") and inspect.isroutine(b)]
            for qual, o in members:
                doc = o.__doc__ and inspect.getdoc(o)
                if doc:
                    yield qual, doc


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut + " ..."


def package_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    by_label, seen = {}, set()
    for label in LABELS:
        mask = re.compile(rf"\b({MASK[label]})\b", re.IGNORECASE)
        texts = []
        for _, doc in documented(label):
            text = clip(mask.sub("___", first_paragraph(doc)), 220)
            if len(text) >= 40 and text not in seen and not text.startswith(("See ", "Same as")):
                seen.add(text)
                texts.append(text)
        rng.shuffle(texts)
        if len(texts) < PER_LABEL:
            sys.exit(f"{label}: only {len(texts)} docstrings")
        by_label[label] = texts[:PER_LABEL]
    train, eval_ = [], []
    for label, texts in by_label.items():
        train += [{"text": t, "label": label} for t in texts[:70]]
        eval_ += [{"text": t, "label": label} for t in texts[70:]]
    rng.shuffle(train)
    rng.shuffle(eval_)
    return train, eval_


def summary_rows(rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    for top in SUMMARY_PACKAGES:
        for qual, doc in documented(top):
            parts = doc.strip().split("\n\n")
            summary = " ".join(parts[0].split())
            body = " ".join(" ".join(parts[1:]).split())
            # a one-line summary (the docstring convention) over a body that explains it
            if "\n" in parts[0] or not (20 <= len(summary) <= 100) or len(body) < 80 or summary in seen:
                continue
            seen.add(summary)
            user = f"Write the one-line docstring summary of `{qual}`. Its documentation goes on:\n{clip(body, 320)}"
            rows.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                                      {"role": "assistant", "content": summary}]})
    rng.shuffle(rows)
    need = sum(SUMMARY_ROWS)
    if len(rows) < need:
        sys.exit(f"summary: only {len(rows)} rows, need {need}")
    return rows[:need]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path.relative_to(OUT.parent.parent.parent)}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")


def main() -> None:
    if sys.version_info[:2] != (3, 11):
        print(f"note: the bundled files were made with Python 3.11; this is {sys.version.split()[0]}")
    rng = random.Random(0)
    train, eval_ = package_rows(rng)
    d = OUT / "pydoc_package"
    write(d / "classify_train.jsonl", train)
    write(d / "classify_eval.jsonl", eval_)
    alpaca = lambda rows: [{"instruction": INSTRUCTION, "input": r["text"], "output": r["label"]} for r in rows]  # noqa: E731
    write(d / "train.jsonl", alpaca(train))
    write(d / "eval.jsonl", alpaca(eval_))
    rows = summary_rows(rng)
    write(OUT / "pydoc_summary" / "train.jsonl", rows[:SUMMARY_ROWS[0]])
    write(OUT / "pydoc_summary" / "eval.jsonl", rows[SUMMARY_ROWS[0]:])


if __name__ == "__main__":
    main()
