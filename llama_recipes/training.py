"""Build TRL's trainers from the recipe: the objective's config class from `training:` (+ `objective:`),
the SFTTrainer for sft, and on CPU the SFT loss from the model's own logits."""
from llama_recipes import batching, data
from llama_recipes.log import get_logger
from llama_recipes.runtime.hardware import has_accelerator, recipe_bf16
from llama_recipes.schema.objective import trainer_settings

log = get_logger(__name__)


def sft_config(recipe, data_overrides: dict | None = None):
    from trl import SFTConfig

    return trl_config(recipe, SFTConfig, data_overrides)  # data keys: see data.sft_overrides


def trl_config(recipe, config_class, extra: dict | None = None):
    """`config_class` (SFTConfig, DPOConfig, ...) from `training:`, the objective's settings and `extra`."""
    kwargs = {**recipe.training.trainer_kwargs(), **trainer_settings(recipe.objective), **(extra or {})}
    kwargs.update(device_kwargs(recipe, kwargs))
    # transformers asks DDP to search for unused parameters whenever the model is not a PreTrainedModel
    # (every PEFT model): an extra autograd traversal per step and a C++ warning on every rank that
    # none were found (our methods use every trainable parameter in each forward). A recipe that has
    # such parameters sets training.ddp_find_unused_parameters: true (DDP's error says so).
    kwargs.setdefault("ddp_find_unused_parameters", False)
    return config_class(output_dir=recipe.output_dir, seed=recipe.seed, **kwargs)


def device_kwargs(recipe, kwargs: dict) -> dict:
    """Trainer arguments that follow the device rather than the recipe (unless the recipe set them).

    bf16 "auto" is normally resolved by distributed.setup (with a log line); this covers callers
    that build a config directly. Pinned memory only helps copies to a GPU: on CPU torch warns.
    transformers refuses bf16 without a GPU unless use_cpu is set.
    """
    out = {}
    gpu = has_accelerator()
    if kwargs.get("bf16") == "auto":
        out["bf16"] = recipe_bf16(recipe)[0]
    if not gpu and "dataloader_pin_memory" not in kwargs:
        out["dataloader_pin_memory"] = False
    if not gpu and out.get("bf16", kwargs.get("bf16")) and "use_cpu" not in kwargs:
        out["use_cpu"] = True
    return out


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, callbacks=None):
    """SFTTrainer over an already-built model (PEFT wrapping and freezing are done by then).

    With packing, the batches are isolated packed rows (batching.PackedRowCollator) rather than
    TRL's one flattened row; `group_by_length` sampling is seeded per epoch (batching).
    """
    from trl import SFTTrainer

    args = sft_config(recipe, data.sft_overrides(recipe, train_ds))
    packed = bool(args.packing) and args.packing_strategy in ("bfd", "bfd_split")
    extra = () if has_accelerator() else (LogitsLossMixin,)
    trainer = batching.trainer_class(SFTTrainer, packed=packed, extra=extra)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if packed:
        batching.install_packed_collator(trainer)
    return trainer


class LogitsLossMixin:
    """Mixed into SFTTrainer on CPU: the loss from the model's own logits, not TRL's fused LM head.

    TRL 1.16 patches the model with a fused LM head that never holds the [batch, seq, vocab]
    logits: it projects in chunks and projects again in backward. On a GPU that saves memory at
    long sequences. On CPU, where a batch's logits are small and the output projection is a large
    share of the FLOPs (49k x 576 of SmolLM2-135M's 134.5M parameters), the second projection cost
    ~15% of every step (docs/benchmarks.md, "Real model"). The loss is the same token-weighted
    cross-entropy (transformers' own, through Trainer.compute_loss: label smoothing and the
    gradient-accumulation normalisation as there). TRL's logged metrics are kept: entropy and
    mean_token_accuracy over the supervised positions (without grad), and num_tokens. What only TRL's
    path computes (training.loss_type: dft, a mixture-of-experts router loss) still goes through it.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch
        from transformers import Trainer

        if self.args.loss_type != "nll" or self.aux_loss_enabled:  # only TRL's own path computes these
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs["use_cache"] = False
        labels = inputs.get("labels")
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            logits = outputs.logits
            if labels.shape[1] < logits.shape[1]:  # prompt tuning: logits include the virtual tokens first
                labels = torch.nn.functional.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=-100)
            target = labels[:, 1:].to(logits.device)
            mask = target != -100
            chosen = logits[:, :-1][mask].float()
            logp = torch.log_softmax(chosen, dim=-1)
            valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
            entropy = self.accelerator.gather_for_metrics(-(logp.exp() * logp).sum()).sum()
            correct = self.accelerator.gather_for_metrics((chosen.argmax(-1) == target[mask]).sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":  # as TRL counts them (batching.PackedRowsMixin corrects packed rows)
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
