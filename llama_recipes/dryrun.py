"""`--dry-run`: the whole round trip in minutes, in a scratch directory, before the real run.

    python run_recipe.py RECIPE --dry-run
    accelerate launch --config_file CONFIG run_recipe.py RECIPE --dry-run

Runs the real pipeline (`pipeline.train`, under whatever launcher started us) for a few steps
with a tiny eval, saves, reloads what it saved into a fresh model, checks the reloaded model
gives the same logits and the same eval loss, and prints PASS/FAIL per stage with the measured
step time and a projection for the full run. The recipe's output_dir is never touched.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

from llama_recipes import artifacts, objectives, pipeline
from llama_recipes.data import build_datasets
from llama_recipes.log import get_logger, is_main_process, world_size
from llama_recipes.measure import autocast
from llama_recipes.runtime import collectives
from llama_recipes.schema import apply_overrides, validate_recipe

log = get_logger(__name__)
DRY_STEPS = 3
EVAL_ROWS = 8


def dry_recipe(recipe, scratch: Path):
    """The recipe with a scratch output_dir, a few steps, no checkpoints or trackers, a tiny eval."""
    t = recipe.training
    steps = DRY_STEPS if t.max_steps <= 0 else min(DRY_STEPS, t.max_steps)
    rows_needed = steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size()
    over = [
        f"output_dir={scratch}",
        f"training.max_steps={steps}",
        "training.save_strategy=no",
        "training.eval_strategy=no",
        "training.report_to=none",
        "training.logging_steps=1",
        "training.warmup_steps=0",
        f"eval.limit={min(recipe.eval.limit or EVAL_ROWS, EVAL_ROWS)}",
        f"eval.max_new_tokens={min(recipe.eval.max_new_tokens, 8)}",
        # only tokenize what the few steps read (plus headroom), not the whole dataset
        f"data.max_samples={min(recipe.data.max_samples or 10**12, max(4 * rows_needed, 64))}",
        f"data.max_eval_samples={min(recipe.data.max_eval_samples or 10**12, EVAL_ROWS)}",
    ]
    if recipe.eval.harness is not None:  # the harness path runs, on a few documents per task
        over.append(f"eval.harness.limit={min(recipe.eval.harness.limit or EVAL_ROWS, EVAL_ROWS)}")
    return validate_recipe(apply_overrides(recipe.to_dict(), over), "<dry run>"), steps


def planned_steps(recipe) -> tuple[int | None, str]:
    """Optimizer steps of the real run: max_steps, or epochs x steps per epoch from the data size."""
    t = recipe.training
    if t.max_steps > 0:
        return t.max_steps, f"max_steps={t.max_steps}"
    train, _, _ = build_datasets(recipe.data)
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size()
    per_epoch = math.ceil(len(train) / per_step)
    note = (f"{t.num_train_epochs:g} epochs x {per_epoch} steps ({len(train)} rows / {per_step} per step"
            f"{'; packing makes it fewer' if getattr(t, 'packing', False) else ''})")
    return math.ceil(per_epoch * t.num_train_epochs), note


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def reload_artifact(out: Path, recipe):
    """A fresh model from what was saved, loaded the way every reader loads it (artifacts.load)."""
    return artifacts.load(recipe, out)[1]


def _probe_batch(run):
    """A few tokenized rows (eval split, else train) as one padded batch."""
    own = getattr(objectives.get(run.recipe.objective.name), "probe_batch", None)  # grpo: prompts, no collator
    if own:
        return own(run)
    ds = run.trainer.eval_dataset if run.trainer.eval_dataset is not None else run.trainer.train_dataset
    rows = [ds[i] for i in range(min(4, len(ds)))]
    batch = run.trainer.data_collator(rows)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _logits(model, batch):
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, stage, ok, detail=""):
        self.rows.append((stage, "PASS" if ok is True else ("SKIP" if ok is None else "FAIL"), detail))
        # a failure is a warning, so that every rank's failure reaches the console
        (log.info if ok is not False else log.warning)("dry run: %-8s %s  %s", stage, self.rows[-1][1], detail)

    def merge_ranks(self) -> None:
        """Under a launcher: a stage fails if it failed on any rank (rank 0's details otherwise)."""
        if not collectives.is_distributed():
            return
        every = collectives.all_gather_object(self.rows)
        merged: dict[str, tuple[str, str, str]] = {}
        for r, rows in enumerate(every):
            for stage, status, detail in rows:
                if stage not in merged or (status == "FAIL" and merged[stage][1] != "FAIL"):
                    merged[stage] = (stage, status, detail if r == 0 else f"[rank {r}] {detail}")
        self.rows = list(merged.values())

    @property
    def passed(self) -> bool:
        return all(s != "FAIL" for _, s, _ in self.rows)

    def render(self) -> str:
        lines = ["dry run:"] + [f"  {s:<5} {stage:<10} {d}" for stage, s, d in self.rows]
        lines.append(f"dry run: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def _fmt_time(sec: float) -> str:
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 7200:
        return f"{sec / 60:.0f} min"
    return f"{sec / 3600:.1f} h"


def _scratch_dir(recipe) -> Path:
    # Every rank must write to the same place: derive the name from the run, not from mkdtemp.
    if world_size() > 1:
        tag = f"{recipe.fingerprint()}-{os.environ.get('MASTER_PORT', '0')}"
        return Path(tempfile.gettempdir()) / f"llama-recipes-dryrun-{tag}"
    return Path(tempfile.mkdtemp(prefix="llama-recipes-dryrun-"))


def run(recipe) -> Report:
    """Run every stage; a failing stage stops the ones that depend on it."""
    report = Report()
    scratch = _scratch_dir(recipe)
    try:
        dry, steps = dry_recipe(recipe, scratch / "out")
        timer = _step_timer()
        try:
            result = pipeline.train(dry, overwrite=True, callbacks=[timer])
        except Exception as e:  # the point of a dry run is to report, not to crash
            report.add("train", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            log.debug("%s", traceback.format_exc())
            return report
        collectives.barrier()  # rank 0 writes the artifact; every rank reloads it
        losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
        ok = result.trainer.state.global_step == steps and losses and all(math.isfinite(x) for x in losses)
        procs = result.trainer.args.world_size
        report.add("train", bool(ok), f"{result.trainer.state.global_step} steps on {procs} process(es), losses "
                   + ", ".join(f"{x:.4f}" for x in losses))
        if world_size() != procs:
            # every rank trained alone, on the same data, writing into the same directory
            report.add("launch", False, f"the launcher started {world_size()} processes but the trainer sees {procs}; "
                       "without GPUs accelerate forms a process group only with ACCELERATE_USE_CPU=1 "
                       "(or training.use_cpu=true)")

        files = sorted(p.name for p in result.output_dir.iterdir() if p.is_file())
        weights = [f for f in files if f.endswith(".safetensors")]
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
        report.add("save", bool(weights) and not pickles,
                   f"{', '.join(weights) or 'no safetensors'}" + (f"; unexpected {pickles}" if pickles else ""))
        if not weights:
            return report

        # Reload as trained: the recipe after the launch config's decisions (precision, the CPU
        # stand-in's fp32), not as written.
        dry = result.recipe
        batch = _probe_batch(result)
        trained = _logits(result.model, batch)
        try:
            fresh = reload_artifact(result.output_dir, dry)
        except Exception as e:
            report.add("reload", False, f"{type(e).__name__}: {str(e).splitlines()[0]}")
            return report
        # The trained model's forward runs under the trainer's autocast (accelerate wraps it):
        # the reloaded one is compared under the same precision, as a user would run it.
        mixed = result.trainer.args.bf16 or result.trainer.args.fp16
        with autocast(result.trainer.args):
            reloaded = _logits(fresh, batch)
        tol = 1e-5 if trained.abs().max() < 1e4 and dry.model.dtype in ("float32", "auto") and not mixed else 1e-2
        diff = (trained - reloaded).abs().max().item() if trained.shape == reloaded.shape else float("inf")
        report.add("reload", diff <= tol * max(1.0, trained.abs().max().item()),
                   f"max |logits difference| {diff:.2e} over {tuple(trained.shape)}")

        # The objective's own measurement (loss for SFT, accuracy for heads, preference accuracy,
        # reward accuracy) of the reloaded model, against what training measured on the same rows.
        objective = objectives.get(dry.objective.name)
        key = objective.primary_metric
        with autocast(result.trainer.args):
            ev = objective.evaluate(fresh, result.tokenizer, result.trainer, result.eval_raw, dry,
                                    reference=result.metrics.get("eval_before"))
            rows = "eval rows"
            if ev is None:  # no eval split: e.g. a finite loss on a few train rows
                ev = objective.fallback_eval(fresh, result.trainer, dry.eval.batch_size)
                rows = "train rows: no eval split"
        if ev is None:
            report.add("eval", None, "no eval split to measure the reloaded model on")
        else:
            after = (result.metrics.get("eval_after") or {}).get(key)
            same = after is None or abs(ev[key] - after) <= 1e-4 * max(1.0, abs(after))
            report.add("eval", math.isfinite(ev[key]) and same, f"reloaded model: {key} {ev[key]:.4f} ({rows})"
                       + (f"; trained model: {after:.4f}" if after is not None else ""))

        timed = timer.times[1:] or timer.times  # the first step pays for warm-up
        step_s = statistics.median(timed)
        total, how = planned_steps(recipe)
        report.add("timing", True, f"{step_s:.3f} s/step (median of {len(timed)}); full run {how}: "
                   f"~{_fmt_time(step_s * total)} of training (+ eval and saving)")
        del fresh
        return report
    finally:
        try:
            report.merge_ranks()
            collectives.barrier()  # nobody is still reading the scratch directory
        except Exception as e:  # a rank that died mid-way: report what this rank saw
            log.warning("dry run: could not collect the other ranks' results: %s", e)
        if is_main_process():
            shutil.rmtree(scratch, ignore_errors=True)


def main(recipe, args) -> int:
    """`--dry-run`: exit 0 when every stage passed, 1 otherwise."""
    report = run(recipe)
    if is_main_process():
        print(report.render(), flush=True)
    return 0 if report.passed else 1
