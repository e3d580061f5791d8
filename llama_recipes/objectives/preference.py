"""Preference objectives (DPO, KTO, ORPO, CPO, SimPO) and reward models, on TRL's trainers.

TRL tokenizes and trains (DPOTrainer, KTOTrainer and RewardTrainer from `trl`; ORPOTrainer and
CPOTrainer from `trl.experimental`, TRL 1.16). What is ours: the data arrives checked and rendered to
TRL's explicit-prompt form (data.py), the config comes from `training:` + `objective:`, the
reference model costs what it must (a PEFT model's reference is the same weights with the adapter
off: TRL 1.16 keeps no second copy; full/partial keep a frozen copy unless
objective.precompute_ref_log_probs), and the run is measured on held-out pairs by preference.py.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from llama_recipes import batching, data, measure, preference, training
from llama_recipes.log import get_logger
from llama_recipes.objectives.base import Objective
from llama_recipes.runtime.hardware import has_accelerator

log = get_logger(__name__)


def _max_length(recipe):
    return measure.training_setting(recipe, "max_length")


class TrainedAdapterOnly:
    """Mixed into the preference trainers: checkpoints and the artifact hold the trained adapter only.

    Given a PEFT model, TRL 1.16's DPO/KTO trainers copy its adapter into a frozen "ref" adapter (the
    reference: the policy as it started) and PEFT's save_pretrained writes every adapter, the copy
    into OUTPUT_DIR/ref/. The copy is rebuilt from the starting adapter whenever the trainer is built
    (a resumed run too), so nothing of it needs saving.
    """

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        ref = Path(output_dir or self.args.output_dir) / "ref"
        if (ref / "adapter_config.json").is_file():
            shutil.rmtree(ref)


class Preference(Objective):
    """Paired preferences (prompt, chosen, rejected), trained by a TRL preference trainer."""

    trainer: tuple[str, str] = ("trl", "DPOTrainer")
    config: tuple[str, str] = ("trl", "DPOConfig")
    primary_metric = "preference_accuracy"
    sequences_per_row = 2
    pairwise = True
    reference_metrics = True

    def _classes(self):
        return tuple(getattr(importlib.import_module(mod), name) for mod, name in (self.trainer, self.config))

    def prepare_data(self, recipe, tokenizer, built):
        train, eval_ds, _ = built
        stats = dict(built.stats)
        sample = train[0] if len(train) else None
        if sample is not None and not isinstance(sample["prompt"], str):  # conversations: the chat template
            data.apply_chat_template_choice(recipe, tokenizer, assistant_spans=False)
        return train, eval_ds, stats

    def build_trainer(self, recipe, model, tokenizer, train_ds, eval_raw, callbacks=None):
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO/CPO: we chose them knowingly
        trainer_cls, config_cls = self._classes()
        args = training.trl_config(recipe, config_cls)
        tokenizer.padding_side = "right" if self.auto_class.endswith("SequenceClassification") else tokenizer.padding_side
        cpu = () if has_accelerator() else (training.CompactLogProbsMixin,)
        cls = batching.trainer_class(trainer_cls, extra=(TrainedAdapterOnly, *cpu))
        trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_raw,
                      processing_class=tokenizer, callbacks=callbacks)
        if getattr(trainer, "ref_model", None) is not None:  # full/partial: TRL loads a copy; it never trains
            trainer.ref_model.requires_grad_(False)
        return trainer

    def _beta(self, recipe) -> float:
        return float(getattr(recipe.objective, "beta", 1.0))

    def evaluate(self, model, tokenizer, trainer, eval_raw, recipe, reference=None):
        if eval_raw is None:
            return None
        rows = eval_raw.select(range(min(len(eval_raw), recipe.eval.limit or len(eval_raw))))
        seqs = preference.sequences(tokenizer, rows, ("chosen", "rejected"))
        logps = preference.completion_logps(model, seqs, tokenizer.pad_token_id, recipe.eval.batch_size,
                                            _max_length(recipe))
        return preference.pair_metrics(logps[0::2], logps[1::2], reference, self._beta(recipe))

    def evaluate_against(self, result, reference, recipe):
        pairs = result["per_pair"]
        return preference.pair_metrics(pairs["chosen"], pairs["rejected"], reference, self._beta(recipe))

    def describe(self, r):
        line = (f"preference_accuracy={r['preference_accuracy']:.4f} logp_margin={r['logp_margin']:.4g} "
                f"({r['examples']} pairs)")
        if "reward_accuracy" in r:
            line += f", implicit reward accuracy {r['reward_accuracy']:.4f} margin {r['reward_margin']:.4g}"
        return line


class DPO(Preference):
    name = "dpo"
    reference = True


class ORPO(Preference):
    name = "orpo"
    trainer = ("trl.experimental.orpo", "ORPOTrainer")
    config = ("trl.experimental.orpo", "ORPOConfig")


class CPO(Preference):
    name = "cpo"
    trainer = ("trl.experimental.cpo", "CPOTrainer")
    config = ("trl.experimental.cpo", "CPOConfig")


class SimPO(CPO):
    name = "simpo"


class KTO(Preference):
    """Unpaired preferences (prompt, completion, label)."""

    name = "kto"
    reference = True
    trainer = ("trl", "KTOTrainer")
    config = ("trl", "KTOConfig")
    primary_metric = "logp_margin"
    sequences_per_row = 1

    def evaluate(self, model, tokenizer, trainer, eval_raw, recipe, reference=None):
        if eval_raw is None:
            return None
        rows = eval_raw.select(range(min(len(eval_raw), recipe.eval.limit or len(eval_raw))))
        seqs = preference.sequences(tokenizer, rows, ("completion",))
        logps = preference.completion_logps(model, seqs, tokenizer.pad_token_id, recipe.eval.batch_size,
                                            _max_length(recipe))
        return preference.unpaired_metrics(logps, list(rows["label"]), reference, self._beta(recipe))

    def evaluate_against(self, result, reference, recipe):
        labels = [bool(x) for x in result["labels"]]
        return preference.unpaired_metrics(result["per_row"], labels, reference, self._beta(recipe))

    def describe(self, r):
        return ", ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, (int, float)))


class Reward(Preference):
    """A reward model: the base as a one-output sequence classifier, trained on pairs (Bradley-Terry)."""

    name = "reward"
    trainer = ("trl", "RewardTrainer")
    config = ("trl", "RewardConfig")
    auto_class = "AutoModelForSequenceClassification"
    peft_task = "SEQ_CLS"
    primary_metric = "pairwise_accuracy"
    reference_metrics = False

    def load_kwargs(self, tokenizer=None):
        # the classifier scores the last non-pad token: it must know the pad id (Llama configs have none)
        return {"num_labels": 1, **({"pad_token_id": tokenizer.pad_token_id} if tokenizer is not None else {})}

    def evaluate(self, model, tokenizer, trainer, eval_raw, recipe, reference=None):
        if eval_raw is None:
            return None
        rows = eval_raw.select(range(min(len(eval_raw), recipe.eval.limit or len(eval_raw))))
        seqs = preference.reward_sequences(tokenizer, rows)
        scores = preference.sequence_scores(model, seqs, tokenizer.pad_token_id, recipe.eval.batch_size,
                                            _max_length(recipe))
        return preference.score_metrics(scores[0::2], scores[1::2])

    def describe(self, r):
        return (f"pairwise_accuracy={r['pairwise_accuracy']:.4f} reward_margin={r['reward_margin']:.4g} "
                f"({r['examples']} pairs)")
