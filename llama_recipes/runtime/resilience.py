"""Nothing lost: exact resume, atomic checkpoints, a clean stop on SIGTERM/SIGINT, a NaN guard, a disk check.

    resume = resilience.resume_checkpoint(recipe, out, overwrite)   # newest complete checkpoint or None
    resilience.check_disk_space(model, recipe, out)                  # before minutes of training
    resilience.install(trainer, recipe)                              # atomic saves, signals, guards
    trainer.train(resume_from_checkpoint=resume)

Checkpoints are written to OUTPUT_DIR/.staging/checkpoint-N and renamed to OUTPUT_DIR/checkpoint-N
only when every file (weights, optimizer, scheduler, RNG, trainer_state.json) is on disk, so a
`checkpoint-N` directory is always complete. The HF Trainer's `resume_from_checkpoint` restores
model or adapter weights, optimizer, scheduler, step, data position (it skips the batches already
seen) and RNG states; tests/test_resilience.py checks the per-step losses match an uninterrupted run.
"""
import json
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger, is_main_process
from llama_recipes.runtime import collectives

log = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
COMPLETE_MARKER = "trainer_state.json"  # the Trainer writes it last
# Test hook: "STEP:pause" waits (up to 120 s, or until a signal) inside the save of STEP, before the
# rename; "STEP:raise" fails there. Lets tests kill or interrupt a run in the middle of a save.
SAVE_HOOK_ENV = "LLAMA_RECIPES_TEST_SAVE_HOOK"


class TrainingStopped(UserError):
    """Training stopped early on purpose (signal) or by a guard; the CLI exits with `exit_code`."""

    exit_code = 3


# -- checkpoints on disk ----------------------------------------------------------------------

def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / COMPLETE_MARKER).is_file()


def complete_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N directories that were fully written, oldest step first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def checkpoint_problem(path: Path, recipe=None) -> str | None:
    """Why a complete-looking checkpoint cannot be resumed from (None when it can).

    Cheap checks only: trainer_state.json parses and holds a step number, weights are there, every
    safetensors header matches its file size, every torch pickle (optimizer, scheduler, RNG) has its
    zip directory, which a truncated file lacks, and the small ones (RNG, scheduler) load with
    weights_only; with `recipe`, an adapter of the recipe's LoRA rank. A bit flip inside a tensor
    is not caught here.
    """
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        step = state["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__})"
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"trainer_state.json holds global_step {step!r}, not a step number"
    if not any(p.suffix in (".safetensors", ".bin") or p.name.startswith(("pytorch_model_fsdp", "global_step"))
               for p in path.iterdir()):
        return "it holds no weights (no *.safetensors)"
    for f in sorted(path.iterdir()):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as h:
                    h.keys()
            elif f.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(f).close()
                if f.name in ("rng_state.pth", "scheduler.pt") or f.name.startswith("rng_state_"):
                    _weights_only_load(f)  # small files the Trainer loads with weights_only=True
        except Exception as e:  # noqa: BLE001 - any failure to open means it cannot be resumed
            return f"{f.name} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    if recipe is not None and (path / "adapter_config.json").is_file():
        try:
            saved = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            return f"adapter_config.json is unreadable ({type(e).__name__})"
        want = getattr(recipe.method, "r", None)
        if want is not None and isinstance(saved, dict) and saved.get("r") not in (None, want):
            return f"its adapter has LoRA rank {saved.get('r')}, the recipe's method.r is {want} (another run's checkpoint)"
    return None


def _weights_only_load(f: Path) -> None:
    """Load as the Trainer will on resume: weights_only, with its numpy allowlist (transformers 5.x
    trainer_pt_utils.safe_globals), so a pickle it would refuse is found before resuming."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"refused by weights-only loading: {str(e).splitlines()[0][:60] if str(e) else type(e).__name__}") from None


def newest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def clean_partial(out: Path) -> list[Path]:
    """Remove half-written checkpoints (the staging area, checkpoint-N without trainer_state.json)."""
    out = Path(out)
    removed = []
    if not is_main_process() or not out.is_dir():
        return removed
    for p in [out / STAGING, *out.iterdir()]:
        if p.is_dir() and (p.name == STAGING or (checkpoint_step(p) is not None and not is_complete(p))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.warning("removed half-written checkpoint(s) left by an interrupted save: %s",
                    ", ".join(p.name for p in removed))
    return removed


def rotate(out: Path, limit: int | None, best: str | None = None) -> list[Path]:
    """Keep at most `limit` complete checkpoints; the newest and the best are never deleted.

    Ordered by step number, not mtime (the HF Trainer's default), so a copied or touched
    directory can never make the newest one look old.
    """
    if not limit or limit <= 0:
        return []
    done = complete_checkpoints(out)
    protected = {done[-1].resolve()} if done else set()
    if best and Path(best).is_dir():
        protected.add(Path(best).resolve())
    keep = max(limit, len(protected))
    removed = []
    for p in done:
        if len(done) - len(removed) <= keep:
            break
        if p.resolve() not in protected:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def resume_checkpoint(recipe, out: Path, overwrite: bool = False) -> str | None:
    """The checkpoint to resume from, per the recipe's `resume:` (auto | never | PATH)."""
    out = Path(out)
    clean_partial(out)
    mode = recipe.resume
    done = complete_checkpoints(out)
    if overwrite:  # the previous run's checkpoints were moved aside (artifacts.claim): start fresh
        return None
    if mode == "never":
        if done:
            raise UserError(
                f"output_dir {out} already holds checkpoints of this recipe (newest: {done[-1].name}) and resume is 'never'",
                "set resume: auto to continue that run, or choose another output_dir, or pass --overwrite to start over",
            )
        return None
    if mode == "auto":
        if not done:
            return None
        damaged = []
        for ckpt in reversed(done):  # the newest one that opens
            problem = checkpoint_problem(ckpt, recipe)
            if problem is None:
                break
            damaged.append(ckpt)
            log.warning("%s cannot be resumed from: %s", ckpt, problem)
        else:
            raise UserError(f"every checkpoint in {out} is damaged (newest: {done[-1].name}: "
                            f"{checkpoint_problem(done[-1], recipe)})",
                            "move the damaged checkpoint-N directories away, or pass --overwrite to start over")
        if damaged:
            log.warning("resuming from the previous complete checkpoint, %s; the damaged %s are not deleted "
                        "(a save of the same step replaces one when training gets there)",
                        ckpt.name, ", ".join(p.name for p in damaged))
        log.info("resuming from %s (step %d): weights, optimizer, scheduler, data position and RNG state",
                 ckpt, checkpoint_step(ckpt))
        return str(ckpt)
    path = Path(mode)
    if not is_complete(path):
        why = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {COMPLETE_MARKER})"
        raise UserError(f"resume: {path} {why}",
                        f"point resume at a checkpoint-N directory that holds {COMPLETE_MARKER}, or use resume: auto")
    problem = checkpoint_problem(path, recipe)
    if problem:
        raise UserError(f"resume: {path} cannot be resumed from: {problem}",
                        "point resume at another checkpoint-N, or use resume: auto (it skips damaged ones)")
    log.info("resuming from %s", path)
    return str(path)


def _fsync_tree(root: Path) -> None:
    # The rename only promises "complete" if the bytes are on disk before it.
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_hook(step: int, signals) -> None:
    spec = os.environ.get(SAVE_HOOK_ENV, "")
    at, _, action = spec.partition(":")
    if not spec or int(at) != step:
        return
    if action == "raise":
        raise RuntimeError(f"{SAVE_HOOK_ENV}: simulated failure inside the save of step {step}")
    log.warning("%s: pausing inside the save of step %d", SAVE_HOOK_ENV, step)
    deadline = time.time() + 120
    while time.time() < deadline and not (signals and signals.received):
        time.sleep(0.05)


def _atomic_checkpoints(trainer, signals=None) -> None:
    """Make the trainer's checkpoint saves atomic and take over save_total_limit."""
    limit = trainer.args.save_total_limit
    trainer.args.save_total_limit = None  # rotation happens here, after the rename, by step number
    original_save = trainer._save_checkpoint
    run_dir_of = trainer._get_output_dir

    def save_checkpoint(model, trial=None):
        run_dir = Path(run_dir_of(trial))
        keep_run_record(trainer, run_dir)
        staging = run_dir / STAGING
        name = f"checkpoint-{trainer.state.global_step}"
        if trainer.args.should_save and is_main_process():  # RANK: should_save alone was true on every rank under torchrun on CPU
            shutil.rmtree(staging / name, ignore_errors=True)
        collectives.barrier()  # before any rank writes its RNG state there
        trainer._get_output_dir = lambda trial=None: str(staging)
        weights, optim = checkpoint_bytes(trainer.model, hasattr(trainer.model, "peft_config"),
                                          bool(trainer.args.save_only_model))
        try:
            # No refusal on the estimate (that would stop a run that may fit); a full disk during the write
            # is worded, and the previous checkpoints stay complete (atomic rename).
            with writing(run_dir, weights + optim, name, precheck=False):
                original_save(model, trial)
        except UserError:
            if is_main_process():
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            del trainer._get_output_dir  # back to the class method
        _save_hook(trainer.state.global_step, signals)
        collectives.barrier()  # every rank wrote its shards and RNG state
        if trainer.args.should_save and is_main_process():
            tmp, final = staging / name, run_dir / name
            best = trainer.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                trainer.state.best_model_checkpoint = str(run_dir / Path(best).name)
                trainer.state.save_to_json(str(tmp / COMPLETE_MARKER))
            # Not needed to resume, and a pickle that would carry training.hub_token in clear.
            (tmp / "training_args.bin").unlink(missing_ok=True)
            if getattr(trainer, "data_fingerprint", None):  # the data this checkpoint was trained on
                (tmp / DATA_FINGERPRINT).write_text(json.dumps(trainer.data_fingerprint) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # same step saved before (a rerun): swap, never leave neither
                old = staging / f"old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            for p in rotate(run_dir, limit, trainer.state.best_model_checkpoint):
                log.info("save_total_limit=%s: deleted %s", limit, p.name)
        collectives.barrier()

    trainer._save_checkpoint = save_checkpoint


# -- SIGTERM / SIGINT ---------------------------------------------------------------------------

def _callbacks():
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """SIGTERM/SIGINT: finish the current step, save a checkpoint, stop with a non-zero exit code.

        A second signal gets the default behaviour (immediate exit), for a user who really means it.
        """

        CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal number, as shells report it

        def __init__(self, out):
            self.out, self.received, self.previous, self.stopped_at = Path(out), None, {}, None

        def _handle(self, signum, frame):
            self.received = signum
            self.restore()
            log.warning("received %s: finishing the current step, then saving a checkpoint (send it again to quit now)",
                        signal.Signals(signum).name)

        def on_train_begin(self, args, state, control, **kw):
            try:
                for sig in self.CODES:
                    self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self.previous = {}

        def on_step_end(self, args, state, control, **kw):
            if collectives.any_rank(self.received is not None):
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step

        def restore(self):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = {}

        def on_train_end(self, args, state, control, **kw):
            self.restore()
            if self.stopped_at is None:
                return
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            err = TrainingStopped(
                f"training stopped by {name} after step {self.stopped_at}; "
                f"checkpoint saved to {self.out / f'checkpoint-{self.stopped_at}'}",
                "rerun the same command to resume from it (resume: auto)",
            )
            err.exit_code = self.CODES.get(self.received, 143)
            raise err

    class NonFiniteGuard(TrainerCallback):
        """Skip updates whose loss or gradient norm is NaN/inf; stop after `max_bad_steps` of them."""

        def __init__(self, out, max_bad_steps: int, check_grads: bool):
            self.out, self.max_bad, self.check_grads = Path(out), max_bad_steps, check_grads
            self.loss_bad, self.bad_steps = False, []

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            import torch

            grads = [p.grad for p in model.parameters() if p.grad is not None] if self.check_grads else []
            grad_bad = bool(grads) and not bool(torch.isfinite(
                torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)).item())
            what = "loss" if self.loss_bad else "gradient norm"
            bad = collectives.any_rank(self.loss_bad or grad_bad)
            self.loss_bad = False
            if not bad:
                return
            for group in optimizer.param_groups:  # grad None: the optimizer leaves these weights alone
                for p in group["params"]:
                    p.grad = None
            step = state.global_step + 1
            self.bad_steps.append(step)
            log.warning("step %d: non-finite %s; update skipped (%d of %d bad steps allowed by guards.max_bad_steps)",
                        step, what, len(self.bad_steps), self.max_bad)
            if len(self.bad_steps) > self.max_bad:
                last = newest_checkpoint(self.out)
                raise TrainingStopped(
                    f"training diverged: non-finite {what} at step {step} "
                    f"(bad steps: {', '.join(map(str, self.bad_steps))}; guards.max_bad_steps={self.max_bad}); "
                    f"last good checkpoint: {last if last else 'none saved yet'}", DIVERGED_FIX)

        def on_step_end(self, args, state, control, model=None, **kw):
            # After the optimizer step, before any checkpoint of it is saved: a finite loss and gradient can
            # still make an update that overflows the weights (a huge learning rate). Such a step cannot be
            # skipped any more (the optimizer state moved too): stop, so that no NaN weights are saved.
            if not collectives.any_rank(not weights_finite(model)):
                return
            last = newest_checkpoint(self.out)
            raise TrainingStopped(
                f"training diverged: the weights became non-finite (inf/NaN) in the update of step {state.global_step} "
                f"(learning rate {_current_lr(kw.get('optimizer'))}); nothing of that step was saved; last good "
                f"checkpoint: {last if last else 'none saved yet'}", DIVERGED_FIX)

    return StopOnSignal, NonFiniteGuard


# A resumed run keeps the learning rate of its checkpoint (optimizer and scheduler state), and the same
# data order reaches the same batch again: the fix that works is a new run with a lower rate.
DIVERGED_FIX = ("lower training.learning_rate (or add training.warmup_steps), check the data for broken rows, prefer "
                "bf16/fp32 over fp16, and rerun with --overwrite (the diverged run is moved aside, and removed once "
                "the new run has saved); resuming would restore the same learning rate and data order")


def weights_finite(model) -> bool:
    """Whether every trainable weight is finite (one host sync; DTensor shards and ZeRO partitions locally)."""
    import torch

    if model is None:
        return True
    checks = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        t = getattr(p, "ds_tensor", None)
        t = t if t is not None else (p.to_local() if hasattr(p, "to_local") else p)
        if t.numel():
            checks.append(torch.isfinite(t.detach()).all())
    return bool(torch.stack(checks).all().item()) if checks else True


def _current_lr(optimizer) -> str:
    try:
        return f"{optimizer.param_groups[0]['lr']:.3g}"
    except (AttributeError, IndexError, KeyError, TypeError):
        return "?"


class _NothingLeftToTrain(Exception):
    """Raised in on_train_begin when the resumed checkpoint is already at the final step."""


def _final_step_callback():
    from transformers import TrainerCallback

    class FinalStepReached(TrainerCallback):
        """A run resumed from a checkpoint of its final step trains nothing (the HF Trainer would run one
        more step: its epoch loop only checks max_steps after a step). on_train_begin comes after the
        checkpoint's weights, optimizer and state are restored, on every rank alike."""

        def on_train_begin(self, args, state, control, **kw):
            if state.max_steps and state.global_step >= state.max_steps:
                raise _NothingLeftToTrain()

    return FinalStepReached


def install(trainer, recipe):
    """Atomic checkpoints, the signal handler and the non-finite guard, on an already-built trainer."""
    StopOnSignal, NonFiniteGuard = _callbacks()
    out = Path(trainer.args.output_dir)
    signals = StopOnSignal(out)
    guard = NonFiniteGuard(out, recipe.guards.max_bad_steps, check_grads=not trainer.args.fp16)
    trainer.data_fingerprint = data_fingerprint(trainer.train_dataset)
    record = out / "recipe.yaml"  # artifacts.RECIPE_FILE, written when the run claimed OUTPUT_DIR
    trainer.run_record = record.read_bytes() if record.is_file() else None
    _atomic_checkpoints(trainer, signals)
    trainer.add_callback(_final_step_callback()())
    trainer.add_callback(signals)
    trainer.add_callback(guard)
    trainer.stop_on_signal = signals  # after_training reads a signal that came during the last step

    original_step = trainer.training_step

    def training_step(*args, **kwargs):
        import torch

        loss = original_step(*args, **kwargs)
        if not bool(torch.isfinite(loss.detach()).all()):
            guard.loss_bad = True
        return loss

    trainer.training_step = training_step
    original_train = trainer.train

    def train(*args, **kwargs):
        from transformers.trainer_utils import TrainOutput

        check_same_data(trainer, kwargs.get("resume_from_checkpoint"))
        try:
            result = original_train(*args, **kwargs)
            if result.global_step == 0:  # the Trainer only warns, and the untrained model would be saved as the result
                raise UserError(
                    "training ran zero optimizer steps: the data loader yielded no complete batch "
                    f"({len(trainer.train_dataset) if hasattr(trainer.train_dataset, '__len__') else '?'} training "
                    f"examples, batch {trainer.args.per_device_train_batch_size} x {trainer.args.gradient_accumulation_steps} "
                    f"accumulation, dataloader_drop_last={trainer.args.dataloader_drop_last})",
                    "add training rows, lower training.per_device_train_batch_size, or set dataloader_drop_last: false")
            return result
        except _NothingLeftToTrain:
            step = trainer.state.global_step
            log.info("the checkpoint resumed from is at the final step (%d): nothing left to train; saving and "
                     "evaluating it", step)
            return TrainOutput(step, float("nan"), {"train_loss": float("nan"), "train_runtime": 0.0})
        finally:  # also when a guard raised mid-training: the process gets its own handlers back
            signals.restore()

    trainer.train = train
    return signals, guard


DATA_FINGERPRINT = "data_fingerprint.json"


def data_fingerprint(ds) -> dict | None:
    """What identifies the training examples a checkpoint was trained on: their number and a hash of the
    token ids of up to 2,000 of them, evenly spaced (a few ms; the recipe's fingerprint covers the settings)."""
    import hashlib

    try:
        n = len(ds)
        if "input_ids" not in ds.column_names:
            return None
        idx = list(range(n)) if n <= 2000 else [i * n // 2000 for i in range(2000)]
        h = hashlib.sha256()
        for ids in ds.select(idx)["input_ids"]:
            h.update(json.dumps(list(ids)).encode())
    except (AttributeError, TypeError, KeyError):  # not a datasets.Dataset (an iterable one): nothing recorded
        return None
    return {"examples": n, "sha256": h.hexdigest()[:16]}


def check_same_data(trainer, resume) -> None:
    """Refuse to resume onto other training data than the checkpoint was trained on (an edited data file):
    the data position the Trainer restores would point into different rows."""
    if not resume:
        return
    path = Path(resume) / DATA_FINGERPRINT
    now = getattr(trainer, "data_fingerprint", None)
    if not path.is_file() or now is None:
        return
    try:
        then = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if then != now:
        raise UserError(f"the training data changed since {Path(resume).name} was saved ({then.get('examples')} "
                        f"examples, hash {then.get('sha256')}; now {now['examples']} examples, hash {now['sha256']}): "
                        "resuming would continue on other rows", "restore the data the run started with, or pass "
                        "--overwrite to train again on the new data (or choose another output_dir)")


def keep_run_record(trainer, out: Path) -> None:
    """OUTPUT_DIR (or its recipe.yaml) removed during training: write the record again before a save, so
    that the checkpoints and the artifact stay this run's (a rerun resumes or says "complete" instead of
    refusing a directory "not written by llama-recipes")."""
    record = getattr(trainer, "run_record", None)
    path = Path(out) / "recipe.yaml"
    if record is None or not is_main_process() or path.is_file():
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    path.write_bytes(record)
    log.warning("%s was removed during training (or its recipe.yaml was): wrote recipe.yaml again; checkpoints "
                "saved before the removal are gone, this save and the next ones are kept", out)


# -- after the last optimizer step ---------------------------------------------------------------

STAGE_HOOK_ENV = "LLAMA_RECIPES_TEST_STAGE_HOOK"  # "after-eval:PATH": touch PATH, wait there for a signal (tests)


STAGES = {"after-eval": "the after-training eval"}


class _CutShort(BaseException):  # BaseException: a library's `except Exception` cannot swallow it
    pass


class after_training:  # lower case: used as `with resilience.after_training(out, trainer) as finishing:`
    """From the last optimizer step on, SIGTERM/SIGINT cannot lose the trained result.

    Inside the block the artifact is written first; a signal then cuts short only what `skippable`
    runs (the after-training eval), the rest of the block (metrics.json: the run is complete) still
    runs, and the block ends with TrainingStopped (exit 143/130) naming what was saved and what was
    skipped. A second signal gets the default behaviour (immediate exit).
    """

    CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

    def __init__(self, out: Path, trainer=None):
        self.out, self.previous, self.skipped, self.in_skippable = Path(out), {}, [], False
        late = getattr(trainer, "stop_on_signal", None)  # a signal during the last step, after its check
        self.received = getattr(late, "received", None)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.CODES:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()  # a second signal: the default action
        log.warning("received %s after training: the result is saved first, then the run stops (send it again "
                    "to quit now)", signal.Signals(signum).name)
        if self.in_skippable:
            raise _CutShort()

    def _restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def skippable(self, stage: str, fn, *args):
        """fn(*args), unless a signal came or comes while it runs: then None (and it is reported)."""
        what = STAGES.get(stage, stage)
        if self.received is None:
            self.in_skippable = True
            try:
                _stage_hook(stage)
                return fn(*args)
            except _CutShort:
                pass
            finally:
                self.in_skippable = False
        self.skipped.append(what)
        log.warning("%s skipped: a signal came", what)
        return None

    def __exit__(self, kind, e, tb):
        self._restore()
        if e is not None or self.received is None:
            return False
        skipped = f"; skipped: {', '.join(self.skipped)}" if self.skipped else ""
        err = TrainingStopped(f"stopped by {signal.Signals(self.received).name} after training; the trained result "
                              f"and metrics.json are saved in {self.out}{skipped}",
                              "nothing to rerun: the run is complete; measure it with --eval-only" if self.skipped
                              else "nothing to rerun: the run is complete")
        err.exit_code = self.CODES.get(self.received, 143)
        raise err


def _stage_hook(stage: str) -> None:
    spec = os.environ.get(STAGE_HOOK_ENV, "")
    at, _, marker = spec.partition(":")
    if at != stage:
        return
    Path(marker).touch()
    deadline = time.time() + 120
    while time.time() < deadline:  # a signal's handler raises out of this sleep
        time.sleep(0.05)


# -- disk ---------------------------------------------------------------------------------------

def checkpoint_bytes(model, is_peft: bool, save_only_model: bool = False) -> tuple[int, int]:
    """(weights, optimizer state) bytes of one checkpoint: saved weights + AdamW's two fp32 moments."""
    seen, weights, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if p.requires_grad:
            trainable += n
            weights += n * p.element_size() if is_peft else 0
        if not is_peft:
            weights += n * p.element_size()
    return weights, 0 if save_only_model else 2 * 4 * trainable


def check_disk_space(model, recipe, out: Path, free: int | None = None) -> int:
    """Fail before training when OUTPUT_DIR cannot hold one checkpoint and the final artifact."""
    t = recipe.training
    weights, optim = checkpoint_bytes(model, recipe.is_peft, bool(getattr(t, "save_only_model", False)))
    saves = str(getattr(t, "save_strategy", "steps")) != "no"
    need = int(1.1 * (weights + (weights + optim if saves else 0))) + 16 * 2**20  # + tokenizer, logs
    probe = Path(out)
    while not probe.exists() and probe != probe.parent:  # other ranks may get here before rank 0 made it
        probe = probe.parent
    free = shutil.disk_usage(probe).free if free is None else free
    if free < need:
        gib = 2**30
        raise UserError(
            f"not enough disk space in {out}: {free / gib:.2f} GiB free, this run needs about {need / gib:.2f} GiB "
            f"(a checkpoint: {weights / gib:.2f} GiB weights + {optim / gib:.2f} GiB optimizer state, and the final artifact)",
            "free disk space, choose an output_dir on a larger disk, or set training.save_only_model=true / "
            "training.save_total_limit to keep fewer checkpoints",
        )
    return need



def is_disk_full(e: BaseException) -> bool:
    """Whether an error from a write means the disk (or quota) is full: OSError ENOSPC/EDQUOT, or the
    same errno as torch's zip writer ("file write failed", inline_container.cc) and safetensors word it."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28",
                                   "file write failed", "unexpected pos"))


def disk_full_error(path: Path, need: int, what: str) -> UserError:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = 0
    mib = 2**20
    return UserError(f"disk full: writing {what} to {path} needs about {need / mib:,.1f} MiB ({need:,} bytes); "
                     f"{free / mib:,.1f} MiB ({free:,} bytes) free",
                     "free disk space (or point the command at a larger disk) and rerun the same command: what "
                     "was complete before is kept")


@contextmanager
def writing(path: Path, need: int, what: str, precheck: bool = True):
    """Check that `path` has `need` bytes free before a write (unless not `precheck`), and word a disk-full
    error during it (ENOSPC from Python, torch's zip writer or safetensors) with the path and the bytes."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if precheck and shutil.disk_usage(probe).free < need:
        raise disk_full_error(path, need, what)
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(path, need, what) from None
        raise
