"""eval.harness: lm-evaluation-harness (lm-eval 0.4.13) on the loaded model, offline, on the tiny Llama.

- the recipe section: builtin tasks, local task YAMLs relative to the recipe, clear errors;
- the numbers agree: the harness's log-likelihood of every (row, choice) of builtin:topic_mc equals
  our own measurement (measure.eval_loss on the same rows in the prompt format training renders,
  data.render_alpaca), so its accuracy equals our scoring of those rows; its greedy answers equal
  measure.generate's;
- the real entry point: before/after in metrics.json and the table, --eval-only on the adapter and
  on the base gives the same numbers as the run's own after/before measurements;
- missing lm-eval: one error naming the install command, before training; hub tasks offline: one
  error naming the task, at once;
- collectives.on_rank0: rank 1 waits past the process group's timeout without failing.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import DEMO_RECIPE, FP32, ROOT, TINY, free_port, run_cli

from llama_recipes.errors import RecipeError, UserError
from llama_recipes.schema import load_recipe

pytest.importorskip("lm_eval", reason='lm-eval is installed by `make setup` (pip install -e ".[harness]")')

TOPIC_EVAL = ROOT / "llama_recipes" / "assets" / "data" / "topic" / "eval.jsonl"
CHOICES = ["animals", "colours", "food", "weather"]
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _recipe_file(tmp_path, harness: str, name="r.yaml"):
    text = DEMO_RECIPE.read_text() + textwrap.indent(harness, "  ")
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the recipe section ---------------------------------------------------------------------------------
def test_task_yaml_paths_are_relative_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text("task: mine\n")
    path = _recipe_file(tmp_path, "harness:\n  tasks: [tasks/mine.yaml, builtin:topic_mc, hellaswag]\n  limit: 5\n")
    monkeypatch.chdir(ROOT)  # not the recipe's directory
    recipe = load_recipe(path)
    assert recipe.eval.harness.tasks == [str(tmp_path / "tasks" / "mine.yaml"), "builtin:topic_mc", "hellaswag"]
    assert recipe.eval.harness.limit == 5 and recipe.eval.harness.num_fewshot is None


@pytest.mark.parametrize("tasks, says", [
    ("[missing.yaml]", "task file 'missing.yaml' not found"),
    ("[builtin:nope]", "no builtin harness task 'builtin:nope'"),
    ("[]", "at least 1 item"),
    ("[builtin:topic_mc, builtin:topic_mc]", "listed twice"),
])
def test_bad_task_entries_are_recipe_errors(tmp_path, tasks, says):
    path = _recipe_file(tmp_path, f"harness:\n  tasks: {tasks}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert says in str(e.value) and "eval.harness.tasks" in str(e.value)


def test_dry_run_runs_the_harness_on_a_few_documents(tmp_path):
    from llama_recipes.dryrun import EVAL_ROWS, dry_recipe

    recipe = load_recipe(DEMO_RECIPE, ["eval.harness={tasks: [builtin:topic_mc], limit: 500}"])
    assert dry_recipe(recipe, tmp_path)[0].eval.harness.limit == EVAL_ROWS
    assert dry_recipe(load_recipe(DEMO_RECIPE), tmp_path)[0].eval.harness is None


# -- the numbers agree -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TINY), AutoTokenizer.from_pretrained(TINY)


def _our_loglikelihoods(model, tokenizer, rows, scored_from: int = 0):
    """Sum of log p(choice tokens | prompt) per (row, choice), with measure.eval_loss (token-weighted
    mean x tokens) on rows in the prompt format training renders (data.render_alpaca; no EOS: the
    harness scores the choice alone). scored_from=-1: the scored part starts one character earlier,
    at the prompt's final newline."""
    import datasets

    from llama_recipes.data import render_alpaca
    from llama_recipes.measure import eval_loss, pad_collate

    out = []
    for row in rows:
        prompt = render_alpaca(row)["prompt"]
        p_ids = tokenizer(prompt[:len(prompt) + scored_from])["input_ids"]
        one = []
        for choice in CHOICES:
            ids = tokenizer(prompt + choice)["input_ids"]
            k = next(i for i in range(len(ids)) if i >= len(p_ids) or ids[i] != p_ids[i])
            ds = datasets.Dataset.from_list([{"input_ids": ids, "labels": [-100] * k + ids[k:]}])
            r = eval_loss(model, ds, lambda b: pad_collate(b, tokenizer.pad_token_id), batch_size=1)
            one.append(-r["loss"] * r["tokens"])
        out.append(one)
    return out


def test_harness_multiple_choice_equals_our_scoring_of_the_same_rows(tiny):
    """builtin:topic_mc through the harness vs our own log-likelihoods of the same held-out rows.

    The harness moves a context's trailing whitespace into the continuation (lm_eval's _encode_pair),
    so it scores "\\n" + choice where training supervises the choice: its log-likelihoods are ours
    plus log p("\\n" | prompt), one constant per row. Accuracy (argmax over choices) is therefore
    the same number; acc_norm (divided by the choice's length) is not comparable to ours.
    """
    from llama_recipes import harness
    from llama_recipes.schema.evaluation import HarnessConfig

    model, tokenizer = tiny
    n = 40
    res = harness.evaluate(model, tokenizer, HarnessConfig(tasks=["builtin:topic_mc"], limit=n), log_samples=True)
    task = res["tasks"]["llama_recipes_topic_mc"]
    assert res["version"] == "0.4.13" and task["samples"] == n and len(task["config_hash"]) == 16
    samples = sorted(res["samples"]["llama_recipes_topic_mc"], key=lambda s: s["doc_id"])
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]

    rows = [json.loads(line) for line in TOPIC_EVAL.read_text().splitlines()[:n]]
    with_newline = _our_loglikelihoods(model, tokenizer, rows, scored_from=-1)
    for a, b in zip(theirs, with_newline):  # what the harness computes, computed by us: equal
        assert a == pytest.approx(b, abs=1e-4)
    ours = _our_loglikelihoods(model, tokenizer, rows)  # the choice's tokens only, as training scores it
    for a, b in zip(theirs, ours):  # differ by one constant per row (the newline's log-probability) ...
        shift = [x - y for x, y in zip(a, b)]
        assert max(shift) - min(shift) < 1e-4 and shift[0] < 0
    ours_acc = sum(max(range(4), key=lambda i: o[i]) == CHOICES.index(r["output"]) for o, r in zip(ours, rows)) / n
    assert task["metrics"]["acc"] == ours_acc  # ... so the accuracy is the same
    assert 0 < ours_acc < 1  # a real comparison: the untrained base gets some right, not all


def test_prompt_tuning_virtual_tokens_do_not_shift_the_scores(tiny):
    """Prompt tuning prepends virtual-token logits (measure.eval_loss trims them; lm_eval 0.4.13 offsets
    by them): the harness's log-likelihoods on a prompt-tuned model stay equal to ours."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llama_recipes import harness
    from llama_recipes.schema.evaluation import HarnessConfig

    import torch

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    tokenizer = tiny[1]
    n = 8
    res = harness.evaluate(model, tokenizer, HarnessConfig(tasks=["builtin:topic_mc"], limit=n), log_samples=True)
    samples = sorted(res["samples"]["llama_recipes_topic_mc"], key=lambda s: s["doc_id"])
    rows = [json.loads(line) for line in TOPIC_EVAL.read_text().splitlines()[:n]]
    ours = _our_loglikelihoods(model, tokenizer, rows, scored_from=-1)
    for s, b in zip(samples, ours):
        assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(b, abs=1e-4)


def test_harness_generation_equals_our_greedy_generation(tiny):
    """builtin:topic_gen: the harness's greedy answers are measure.generate's (cut at its stop string)."""
    from llama_recipes import harness
    from llama_recipes.data import render_alpaca
    from llama_recipes.measure import generate
    from llama_recipes.metrics import exact_match
    from llama_recipes.schema.evaluation import HarnessConfig

    model, tokenizer = tiny
    n = 16
    res = harness.evaluate(model, tokenizer, HarnessConfig(tasks=["builtin:topic_gen"], limit=n, batch_size=4),
                           log_samples=True)
    samples = sorted(res["samples"]["llama_recipes_topic_gen"], key=lambda s: s["doc_id"])
    rows = [json.loads(line) for line in TOPIC_EVAL.read_text().splitlines()[:n]]
    ours = generate(model, tokenizer, [render_alpaca(r)["prompt"] for r in rows], max_new_tokens=12, batch_size=4)
    assert [s["filtered_resps"][0] for s in samples] == [o.split("\n")[0] for o in ours]
    em = sum(exact_match(o.split("\n")[0], r["output"]) for o, r in zip(ours, rows)) / n
    assert res["tasks"]["llama_recipes_topic_gen"]["metrics"]["exact_match"] == em


def test_the_harness_leaves_the_global_rng_as_it_found_it(tiny):
    """lm-eval seeds python/numpy/torch; before training that would change the run's dropout and
    sampling from the same recipe without eval.harness. harness.py puts the states back."""
    import random

    import numpy as np
    import torch

    from llama_recipes import harness
    from llama_recipes.schema.evaluation import HarnessConfig

    model, tokenizer = tiny
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = torch.rand(3).tolist(), random.random(), np.random.rand()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    harness.evaluate(model, tokenizer, HarnessConfig(tasks=["builtin:topic_mc"], limit=4))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == expected


def test_config_hash_follows_the_data_not_its_path(tmp_path):
    """The same task over a copy of its data file elsewhere has the same hash; one changed row, another."""
    from llama_recipes import harness

    src = ROOT / "llama_recipes" / "assets" / "harness" / "topic_mc.yaml"
    base = harness._local_config(src)
    (tmp_path / "d").mkdir()
    copy = tmp_path / "d" / "eval.jsonl"
    copy.write_bytes(TOPIC_EVAL.read_bytes())
    moved = {**base, "dataset_kwargs": {"data_files": {"test": str(copy)}}}
    assert harness.config_hash(base) == harness.config_hash(moved)
    copy.write_text(TOPIC_EVAL.read_text().replace("bird", "bear", 1))
    assert harness.config_hash(base) != harness.config_hash(moved)


def test_classifier_head_scored_by_the_harness_equals_its_own_accuracy(tmp_path):
    """A classification head through lm-eval (builtin:classify_head: the held-out rows, choices = its
    labels, scored by the head's label log-probabilities) gives exactly the head's own accuracy,
    before and after training; a generation task on a head is one clear error."""
    out = tmp_path / "out"
    proc = run_cli(str(ROOT / "recipes" / "demo" / "tiny_classifier_head.yaml"), f"output_dir={out}", FP32,
                   "training.max_steps=20", "training.report_to=none", "eval.limit=64",
                   "eval.harness={tasks: [builtin:classify_head], limit: 64}", env=THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    for tag in ("eval_before", "eval_after"):
        task = m[tag]["harness"]["tasks"]["llama_recipes_classify_head"]
        assert task["samples"] == m[tag]["examples"] == 64
        assert task["metrics"]["acc"] == m[tag]["accuracy"], tag
    assert m["eval_after"]["accuracy"] > m["eval_before"]["accuracy"]

    from llama_recipes import harness, heads
    from llama_recipes.schema.evaluation import HarnessConfig

    head = heads.load(out)
    with pytest.raises(UserError, match="answers multiple-choice tasks whose choices are its labels"):
        harness.evaluate(head.model, head.tokenizer, HarnessConfig(tasks=["builtin:topic_gen"], limit=2))


@pytest.mark.slow
# -- errors --------------------------------------------------------------------------------------------
def test_hub_task_offline_is_one_error_naming_it(tiny):
    from llama_recipes import harness
    from llama_recipes.schema.evaluation import HarnessConfig

    model, tokenizer = tiny
    started = time.time()
    with pytest.raises(UserError) as e:
        harness.evaluate(model, tokenizer, HarnessConfig(tasks=["hellaswag"], limit=2))
    assert "'hellaswag'" in str(e.value) and "local task YAML" in str(e.value)
    with pytest.raises(UserError) as e:
        harness.evaluate(model, tokenizer, HarnessConfig(tasks=["hellaswg"], limit=2))
    assert "not a harness task name: 'hellaswg' (did you mean hellaswag" in str(e.value)
    assert time.time() - started < 120  # indexing lm-eval's task list, no retry loop


def test_unreachable_hub_is_found_at_once_without_offline_flags(monkeypatch):
    """Without HF_HUB_OFFLINE, datasets retries 5 times (~25 s) per hub task; one connect says it first."""
    from llama_recipes import harness

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.time()
    assert "cannot be reached" in harness._hub_unreachable()
    assert time.time() - started < 10


def test_missing_lm_eval_is_one_error_before_training(tmp_path):
    """The real entry point with lm_eval unimportable: exit 2, the install command, no artifact."""
    path = _recipe_file(tmp_path, "harness:\n  tasks: [builtin:topic_mc]\n")
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # what `import lm_eval` meets when it is not installed
            "from llama_recipes.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", code, str(path), f"output_dir={out}", FP32, "training.max_steps=2",
                           "training.report_to=none", "data.max_samples=32"],
                          cwd=ROOT, env={**os.environ, **THREADS}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'pip install -e ".[harness]"' in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert "'loss'" not in proc.stdout + proc.stderr  # no training step was logged


# -- the real entry point ------------------------------------------------------------------------------------
HARNESS = ["eval.harness={tasks: [builtin:topic_mc, builtin:topic_gen], limit: 24, batch_size: 8}"]
SHORT = [FP32, "training.max_steps=30", "training.logging_steps=10", "training.report_to=none",
         "data.max_samples=480", "eval.limit=24", "eval.max_new_tokens=6"]


@pytest.mark.slow
def test_before_after_and_eval_only_agree(tmp_path):
    """A LoRA run measures the harness before and after training (metrics.json and the table);
    --eval-only on the saved adapter repeats the after numbers, --eval-only --base the before ones."""
    out = tmp_path / "out"
    proc = run_cli(str(DEMO_RECIPE), f"output_dir={out}", *SHORT, *HARNESS, env=THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    before, after = m["eval_before"]["harness"], m["eval_after"]["harness"]
    assert before["version"] == after["version"] == "0.4.13"
    for task in ("llama_recipes_topic_mc", "llama_recipes_topic_gen"):
        assert before["tasks"][task]["config_hash"] == after["tasks"][task]["config_hash"]
        assert before["tasks"][task]["samples"] == 24
    mc_b, mc_a = before["tasks"]["llama_recipes_topic_mc"]["metrics"], after["tasks"]["llama_recipes_topic_mc"]["metrics"]
    assert mc_a != mc_b  # the trained adapter is measured, not the base twice
    assert f"| llama_recipes_topic_mc/acc | {mc_b['acc']:.4f} | {mc_a['acc']:.4f} |" in proc.stderr

    for flags, expected in (([], after), (["--base"], before)):
        ev = run_cli(str(DEMO_RECIPE), f"output_dir={out}", *SHORT, *HARNESS, "--eval-only", *flags, env=THREADS)
        assert ev.returncode == 0, ev.stderr[-3000:]
        where = out / "eval" / ("base" if flags else "") / "eval_results.json"
        got = json.loads(where.read_text())["harness"]
        for task, r in expected["tasks"].items():
            assert got["tasks"][task]["config_hash"] == r["config_hash"]
            for k, v in r["metrics"].items():
                assert got["tasks"][task]["metrics"][k] == pytest.approx(v, abs=1e-9), (flags, task, k)
        assert "llama_recipes_topic_mc/acc" in ev.stderr


@pytest.mark.slow
def test_two_processes_run_the_harness_on_rank0_only(tmp_path):
    """accelerate launch, 2 CPU processes (DDP): rank 0 runs the harness (lm-eval's own logger, which
    is not rank-aware, says so once per measurement), rank 1 waits, both train, the run ends normally.
    That the wait outlives the process group's timeout is test_on_rank0_outlives_the_process_group_timeout
    (training.ddp_timeout does not reach a CPU run's process group: docs/development.md)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_ddp_2proc.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "run_recipe.py"), str(DEMO_RECIPE), f"output_dir={out}", *SHORT, "training.max_steps=4",
           "eval.harness={tasks: [builtin:topic_mc], limit: 24}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **THREADS}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_after"]["harness"]["tasks"]["llama_recipes_topic_mc"]["samples"] == 24
    assert proc.stderr.count("Passed an already-initialized model through `pretrained`") == 2  # before + after, rank 0


@pytest.mark.slow
def test_after_fsdp_training_the_harness_says_skipped(tmp_path):
    """FSDP shards the parameters: one rank cannot run the model alone after training. Before
    training (not yet sharded) rank 0 measures; after, the entry says skipped and names --eval-only."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_fsdp_2proc.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "run_recipe.py"), str(DEMO_RECIPE), f"output_dir={out}", *SHORT, "training.max_steps=2",
           "eval.harness={tasks: [builtin:topic_mc], limit: 8}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **THREADS}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_before"]["harness"]["tasks"]["llama_recipes_topic_mc"]["samples"] == 8
    assert "--eval-only" in m["eval_after"]["harness"]["skipped"]


# -- collectives.on_rank0 -------------------------------------------------------------------------------
_WORKER = textwrap.dedent("""
    import datetime, json, os, sys, time
    import torch.distributed as dist
    from llama_recipes.errors import UserError
    from llama_recipes.runtime import collectives
    rank, mode = int(os.environ["RANK"]), sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1))
    def job():
        time.sleep(3)  # longer than the group's timeout
        if mode == "error":
            raise UserError("bad task", "fix it")
        return {"acc": 0.5}
    try:
        if mode == "barrier":  # the naive way: rank 0 works, the others sit in a barrier
            job() if rank == 0 else None
            dist.barrier()
            got = "ok"
        else:
            got = collectives.on_rank0(job, "job")
    except UserError as e:
        got = "UserError: " + e.problem
    except Exception as e:
        got = type(e).__name__
    print(json.dumps({"rank": rank, "got": got}), flush=True)
    os._exit(0)
""")


def _two_ranks(tmp_path, mode: str) -> list:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(script), mode], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **THREADS, "RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    return [json.loads(o.strip().splitlines()[-1])["got"] if o.strip() else e[-500:] for o, e in outs]


@pytest.mark.slow
def test_on_rank0_outlives_the_process_group_timeout(tmp_path):
    assert _two_ranks(tmp_path, "ok") == [{"acc": 0.5}, {"acc": 0.5}]
    assert _two_ranks(tmp_path, "error") == ["UserError: bad task", "UserError: bad task"]
    naive = _two_ranks(tmp_path, "barrier")
    assert naive[1] != "ok"  # the same wait through the default group times out: the test can fail
