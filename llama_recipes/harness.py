"""`eval.harness`: EleutherAI's lm-evaluation-harness on the model in memory, before/after training and in --eval-only.

    eval:
      harness:
        tasks: [builtin:pydoc_package_mc, my_tasks/quiz.yaml, hellaswag]
        num_fewshot: 0
        limit: 200

The harness gets the model already loaded (lm_eval's HFLM wrapping our model object), so any
artifact kind (adapter, merged, full, a run from a GGUF) is measured as the run computes:
the same weights, the recipe's precision (bf16/fp16 autocast) and device. It runs on rank 0
only; the other ranks wait (collectives.on_rank0). Results: per task and metric, with the
harness version and a hash of the task's config (and its local data files), under `harness` in
metrics.json (eval_before/eval_after) and eval_results.json.

lm-eval is an optional extra (`pip install -e ".[harness]"`, which `make setup` installs); it is
imported only when a recipe asks for it. Local task YAMLs (and the builtin ones over the
package's bundled data) work offline; hub tasks need the network the first time.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

from llama_recipes import heads
from llama_recipes.errors import UserError
from llama_recipes.log import get_logger
from llama_recipes.measure import autocast
from llama_recipes.runtime import collectives, distributed
from llama_recipes.schema.evaluation import HARNESS_BUILTIN, HARNESS_TASKS_DIR, is_task_file

log = get_logger(__name__)
INSTALL = 'pip install -e ".[harness]"   (or `make setup`, which installs it)'
TESTED_VERSION = "0.4.13"  # the version this module is written against (setup.cfg pins it)
_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets builders that read local files


def require():
    """The lm_eval module, or a UserError naming the install command."""
    try:
        import lm_eval
    except ImportError:
        raise UserError("eval.harness needs EleutherAI's lm-evaluation-harness (the Python package lm-eval), "
                        "which is not installed", INSTALL) from None
    return lm_eval


def check(recipe, model=None) -> None:
    """eval.harness can run: lm-eval installed, and (given) a model it can score: a language model,
    or a classification head (multiple-choice tasks over its labels: HeadLM).

    measure() and evaluation.eval_only call it before anything is measured, so a missing install
    fails before training starts.
    """
    if recipe.eval.harness is None:
        return
    require()
    if model is None or _head_of(model) is not None:
        return
    out = getattr(model, "get_output_embeddings", None)
    if out is None or out() is None:
        raise UserError(f"eval.harness: the model of method {recipe.method.name} has neither token logits "
                        "nor a classification head's label logits", "remove eval.harness")


def _head_of(model) -> dict | None:
    """The head config of a classification-head model (heads.py sets it on every head model), else None."""
    cfg = getattr(model, "head_config", None)
    return cfg if isinstance(cfg, dict) and "labels" in cfg else None


# -- task specs -------------------------------------------------------------------------------------
def task_source(entry: str) -> Path | None:
    """The local YAML a task entry names (builtin:NAME or a path), or None for a harness task name."""
    if entry.startswith(HARNESS_BUILTIN):
        return HARNESS_TASKS_DIR / f"{entry[len(HARNESS_BUILTIN):]}.yaml"
    return Path(entry).expanduser() if is_task_file(entry) else None


def _local_config(path: Path) -> dict:
    """A task YAML as the config dict lm_eval takes, with relative data_files made relative to the YAML.

    lm_eval reads `dataset_kwargs.data_files` relative to the current directory; a task file
    that ships next to its data must work from anywhere.
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # lm_eval 0.4.13: the loader its TaskManager uses

    try:
        cfg = load_yaml(path)
    except Exception as e:  # noqa: BLE001 - a YAML error, a missing include or !function module
        raise UserError(f"harness task file {path}: {type(e).__name__}: {e}", "fix the task YAML") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise UserError(f"harness task file {path} has no `task:` name", "add `task: my_task_name` to it")
    kwargs = cfg.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        def fix(f):
            return f if os.path.isabs(f) or "://" in f else str((path.parent / f).resolve())
        files = kwargs["data_files"]
        files = {k: ([fix(x) for x in v] if isinstance(v, list) else fix(v)) for k, v in files.items()} \
            if isinstance(files, dict) else [fix(x) for x in files] if isinstance(files, list) else fix(files)
        cfg["dataset_kwargs"] = {**kwargs, "data_files": files}
    return cfg


def _data_files(cfg: dict) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    files = list(files.values()) if isinstance(files, dict) else files if isinstance(files, list) else [files]
    flat = [x for f in files for x in (f if isinstance(f, list) else [f])]
    return [f for f in flat if isinstance(f, str) and os.path.isfile(f)]


def config_hash(cfg: dict) -> str:
    """sha256 (16 hex) of a task's config as lm_eval ran it, local data files by content, not path.

    Equal hashes: the same prompts, choices, metrics and rows, wherever the files lie.
    """
    h = hashlib.sha256()
    files = set(_data_files(cfg))
    clean = json.loads(json.dumps(cfg, default=str))
    kwargs = clean.get("dataset_kwargs") or {}
    kwargs.pop("data_files", None)
    h.update(json.dumps(clean, sort_keys=True).encode())
    for f in sorted(files, key=lambda f: Path(f).name):
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()[:16]


# -- running -----------------------------------------------------------------------------------------
def _loaded_lm(model, tokenizer, batch_size: int, dtype):
    """lm_eval's HFLM around our model object (no reload). Prompt/prefix tuning's virtual-token
    logits need nothing here: lm_eval 0.4.13 offsets by them (_loglikelihood_tokens, ctx_len)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mixed_precision_dtype=dtype)


def _head_lm(model, tokenizer, cfg: dict, batch_size: int, precision):
    """A classification head as an lm_eval LM: a multiple-choice request (text, label name) scores the
    head's log-probability of that label given the text (heads.batch_logits, the head's own eval),
    so a task's acc over the eval rows is the head's accuracy. Other request kinds are refused."""
    from lm_eval.api.model import LM

    labels = list(cfg["labels"])

    def refuse(kind):
        raise UserError(f"eval.harness: a classification head ({cfg.get('method')}) answers multiple-choice tasks "
                        f"whose choices are its labels ({', '.join(labels)}), not {kind} requests",
                        "use a multiple-choice task over the label names (e.g. builtin:pydoc_package_head)")

    class HeadLM(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            texts = list(dict.fromkeys(r.args[0] for r in requests))
            with autocast(precision):
                logp = heads.batch_logits(model, tokenizer, texts, batch_size, cfg.get("max_length")).log_softmax(-1)
            row = {t: i for i, t in enumerate(texts)}
            out = []
            for r in requests:
                text, choice = r.args
                if choice.strip() not in labels:
                    raise UserError(f"eval.harness: choice {choice.strip()!r} is not one of the head's labels "
                                    f"({', '.join(labels)})", "make the task's choices the label names")
                lp = logp[row[text]]
                k = labels.index(choice.strip())
                out.append((float(lp[k]), bool(int(lp.argmax()) == k)))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            refuse("rolling log-likelihood (perplexity)")

        def generate_until(self, requests, disable_tqdm=False):
            refuse("generation")

    return HeadLM()


def _precision_dtype(precision):
    import torch

    if getattr(precision, "bf16", False) is True:
        return torch.bfloat16
    return torch.float16 if getattr(precision, "fp16", False) else None


@functools.lru_cache(maxsize=2)
def _task_manager(with_harness_tasks: bool):
    """lm_eval's TaskManager; indexing its ~15k bundled task YAMLs takes seconds: only when a task is named, once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=with_harness_tasks)


def _run(model, tokenizer, cfg, precision, log_samples: bool) -> dict:
    lm_eval = require()
    started = time.time()
    specs, sources = [], {}
    for entry in cfg.tasks:
        path = task_source(entry)
        if path is None:
            specs.append(entry)
        else:
            specs.append(_local_config(path))
            sources[specs[-1]["task"]] = entry
    names = [s for s in specs if isinstance(s, str)]
    manager = _task_manager(bool(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        import difflib

        close = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        raise UserError("eval.harness.tasks: not a harness task name: " + "; ".join(
            f"{n!r}" + (f" (did you mean {', '.join(c)}?)" if c else "") for n, c in close.items()),
            "use a name `lm_eval --tasks list` shows, a path to a task YAML, or a builtin: task")
    loaded = _load_tasks(manager, specs)

    was_training = model.training
    head = _head_of(model)
    lm = _head_lm(model, tokenizer, head, cfg.batch_size, precision) if head \
        else _loaded_lm(model, tokenizer, cfg.batch_size, _precision_dtype(precision))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(loaded.values()), task_manager=manager, num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, bootstrap_iters=1000, log_samples=log_samples,
                                      random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                                      fewshot_random_seed=1234)
    finally:
        model.train(was_training)
    tasks = {}
    for name, res in out["results"].items():
        metrics = {}
        for key, value in res.items():
            metric, sep, filt = key.partition(",")
            if not sep or not isinstance(value, (int, float)):
                continue
            metrics[metric if filt == "none" else f"{metric}:{filt}"] = float(value)
        conf = out["configs"].get(name, {})
        tasks[name] = {"source": sources.get(name, name), "config_hash": config_hash(conf),
                       "samples": int(out.get("n-samples", {}).get(name, {}).get("effective", res.get("sample_len", 0))),
                       "num_fewshot": out.get("n-shot", {}).get(name), "metrics": metrics}
    result = {"version": lm_eval.__version__, "tasks": tasks, "limit": cfg.limit,
              "seconds": round(time.time() - started, 3)}
    if log_samples:
        result["samples"] = out.get("samples", {})
    return result


def _hub_unreachable() -> str:
    """Why the HuggingFace Hub cannot be reached ('' if it can): one quick connect instead of
    datasets' five retries (~25 s) per hub task."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return ""  # datasets then reads its cache at once (and fails at once if the dataset is not there)
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached ({e})"
    return ""


def _load_tasks(manager, specs) -> dict:
    """lm_eval Task objects (their datasets loaded); a dataset that cannot be reached: one UserError naming the task."""
    loaded = {}
    for spec in specs:
        name = spec if isinstance(spec, str) else spec["task"]
        if isinstance(spec, str) or spec.get("dataset_path") not in _LOCAL_BUILDERS:
            why = _hub_unreachable()
            if why:
                raise UserError(f"eval.harness task {name!r} reads its dataset from the HuggingFace Hub, and {why}",
                                "run it where the network is (later runs read the datasets cache with HF_HUB_OFFLINE=1), "
                                "or use a local task YAML or a builtin: task (docs/evaluation.md)")
        try:
            loaded.update(manager.load([spec])["tasks"])
        except (ConnectionError, OSError) as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or "Offline" in str(e)
            raise UserError(
                f"eval.harness task {name!r}: its dataset could not be loaded"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {str(e).splitlines()[0][:200]}",
                "hub tasks need the network the first time (then the datasets cache); offline, use a local task "
                "YAML over a local file (dataset_path: json, dataset_kwargs.data_files; see docs/evaluation.md) "
                "or a builtin: task") from None
        except (KeyError, ValueError, TypeError) as e:  # a bad key in a task YAML (unknown filter, metric, ...)
            raise UserError(f"eval.harness task {name!r}: lm-eval refuses its config: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}", "fix the task YAML (docs/evaluation.md)") from None
    return loaded


def evaluate(model, tokenizer, cfg, precision=None, log_samples: bool = False) -> dict:
    """Run `cfg` (an eval.harness section) on the loaded model; rank 0 runs it, every rank gets the result.

    `precision`: an object with bf16/fp16 flags (TrainingArguments, evaluation.recipe_precision):
    the harness's forward passes run under that autocast, as training and our own eval do.
    Under FSDP the parameters are sharded across ranks and one rank cannot run the model alone:
    the result then says so (`skipped`) and --eval-only measures the saved artifact.
    """
    if distributed.is_sharded(model) and collectives.rank_world()[1] > 1:
        return {"skipped": "the model is sharded (FSDP); run --eval-only on the saved artifact"}
    return collectives.on_rank0(lambda: _run_keeping_rng(model, tokenizer, cfg, precision, log_samples), "eval.harness")


def _run_keeping_rng(model, tokenizer, cfg, precision, log_samples: bool) -> dict:
    """_run with python's, numpy's and torch's global RNG states put back afterwards.

    simple_evaluate seeds all three (its own reproducibility); before training that would change
    the run's dropout and sampling from what the same recipe without eval.harness gets.
    """
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return _run(model, tokenizer, cfg, precision, log_samples)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def measure(result: dict | None, model, tokenizer, recipe, precision) -> dict | None:
    """The before/after hook of a training run: `result` (the objective's numbers, None without an eval
    split) with the harness's numbers under `harness`."""
    if recipe.eval.harness is None:
        return result
    check(recipe, model)
    harness = evaluate(model, tokenizer, recipe.eval.harness, precision)
    log.info("harness: %s", describe(harness))
    return {**(result or {}), "harness": harness}


# -- reporting -----------------------------------------------------------------------------------------
def _flat(h: dict | None) -> dict[str, float]:
    if not h or "tasks" not in h:
        return {}
    return {f"{task}/{m}": v for task, r in h["tasks"].items() for m, v in r["metrics"].items()
            if not m.endswith("_stderr") and "_stderr:" not in m}


def describe(h: dict) -> str:
    """One log line: task/metric=value ..."""
    if "skipped" in h:
        return f"skipped: {h['skipped']}"
    return ", ".join(f"{k}={v:.4g}" for k, v in _flat(h).items()) + f" (lm-eval {h['version']}, {h['seconds']:.0f} s)"


def table_rows(before: dict | None, after: dict | None) -> list[str]:
    """Rows `| harness task/metric | before | after |` for the before/after table (none without harness)."""
    b, a = _flat((before or {}).get("harness")), _flat((after or {}).get("harness"))
    return [f"| {k} | {b[k]:.4f} | {a[k]:.4f} |" for k in a if k in b]


def results_rows(h: dict | None) -> list[str]:
    """Rows for --eval-only's one-column table."""
    if not h:
        return []
    if "skipped" in h:
        return ["", f"harness: skipped ({h['skipped']})"]
    rows = ["", f"| harness task/metric (lm-eval {h['version']}) | value | stderr |", "|---|---|---|"]
    for task, r in h["tasks"].items():
        for m, v in r["metrics"].items():
            if "_stderr" in m:
                continue
            err = r["metrics"].get(m.replace(":", "_stderr:", 1) if ":" in m else f"{m}_stderr")
            rows.append(f"| {task}/{m} | {v:.4f} | {err:.4f} |" if isinstance(err, float) else f"| {task}/{m} | {v:.4f} | |")
    return rows
