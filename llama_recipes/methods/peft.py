"""PEFT methods: LoRA, DoRA, QLoRA, LLaMA-Adapter, prefix tuning, prompt tuning, IA3.

Each wraps the base in a PEFT model (`get_peft_model` with the method's config); the artifact
is the adapter alone (adapter_config.json + adapter_model.safetensors), loadable with plain
`PeftModel.from_pretrained`. docs/methods.md describes each method and its measured numbers.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager

from llama_recipes import batching, modeling, objectives
from llama_recipes.errors import UserError
from llama_recipes.log import get_logger
from llama_recipes.methods.lm import LMMethod
from llama_recipes.paths import tokenizer_path

log = get_logger(__name__)


@contextmanager
def peft_errors(model):
    """PEFT's 'target modules not found' as a UserError naming modules that do exist."""
    try:
        yield
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        head = model.get_output_embeddings()  # TRL refuses LoRA on the LM head
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if type(m).__name__ == "Linear" and m is not head})
        raise UserError(f"method.target_modules matches no module of the model: {str(e).splitlines()[0]}",
                        f"use names this model has: {', '.join(linear)} (or all-linear)") from None


def linear_targets(shape, targets) -> list[str]:
    """The Linear layers (by name) that target_modules selects, as PEFT selects them."""
    if targets in ("all-linear", None):
        # PEFT's all-linear: every Linear except the output layer.
        return [n for n in shape.linears if not n.endswith("lm_head")]
    if isinstance(targets, str):
        return [n for n in shape.linears if re.fullmatch(targets, n)]
    return [n for n in shape.linears if n.split(".")[-1] in targets]


class PeftMethod(LMMethod):
    peft = True

    def peft_config(self, cfg, model=None, tokenizer_path: str | None = None, task: str = "CAUSAL_LM"):
        """The PEFT config; `task` is the objective's PEFT task type (SEQ_CLS trains a reward model's score head)."""
        raise NotImplementedError

    def make_trainable(self, model, recipe):
        from peft import get_peft_model

        if recipe.model.adapter:  # continue a previous run's adapter (schema/start.py checked its shape)
            log.info("continuing the adapter of %s (its weights train on; the starting model is the reference)",
                     recipe.model.adapter)
            return modeling.load_adapter(model, recipe.model.adapter, trainable=True)
        tok_path = tokenizer_path(recipe.model)
        task = objectives.get(recipe.objective.name).peft_task
        with peft_errors(model):
            return get_peft_model(model, self.peft_config(recipe.method, model, tok_path, task))


class Lora(PeftMethod):
    """LoRA: low-rank update matrices next to frozen linear layers."""

    name = "lora"
    mergeable = True

    def peft_config(self, cfg, model=None, tokenizer_path=None, task="CAUSAL_LM"):
        from peft import LoraConfig

        return LoraConfig(task_type=task, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                          modules_to_save=cfg.modules_to_save or None)

    def make_trainable(self, model, recipe):
        # PEFT writes unknown modules_to_save names into adapter_config.json and trains nothing for them.
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in recipe.method.modules_to_save or [] if m not in names]
        if missing:
            head = model.get_output_embeddings()
            hint = [n for n, mod in model.named_children()] + ([n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                                                                  if mod is head][:1])
            raise UserError(f"method.modules_to_save {missing} names no module of the model",
                            f"use module names the model has (e.g. {', '.join(sorted(set(hint)))}, embed_tokens)")
        return super().make_trainable(model, recipe)

    def estimate_params(self, shape, m):
        r, extra = int(m["r"]), {}
        for t in linear_targets(shape, m.get("target_modules")):
            fin, fout = shape.linears[t]
            extra[f"{t}.lora_A"] = r * fin
            extra[f"{t}.lora_B"] = r * fout
            if m.get("use_dora"):
                extra[f"{t}.lora_magnitude_vector"] = fout
        for mod in m.get("modules_to_save") or []:  # a trainable copy next to the frozen original
            for n, sh in shape.params.items():
                if n.split(".")[-2] == mod or n.startswith(mod + "."):
                    extra[f"{n}.modules_to_save"] = math.prod(sh)
        return extra, []


class Dora(Lora):
    """DoRA: LoRA with use_dora (the schema pins it on)."""

    name = "dora"


class QLora(Lora):
    """LoRA on a base quantized by bitsandbytes at load time."""

    name = "qlora"
    quantized = True

    def load_kwargs(self, cfg):
        import torch
        from transformers import BitsAndBytesConfig

        if cfg.bits == 8:
            return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type, bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, cfg.quant_storage_dtype or "uint8"))}

    def make_trainable(self, model, recipe):
        from peft import prepare_model_for_kbit_training

        # Casts the non-quantized layers (norms, embeddings, head) to fp32 for stable training,
        # freezes the base and, if asked, turns on activation checkpointing with input grads.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(getattr(recipe.training, "activation_checkpointing", False)))
        return super().make_trainable(model, recipe)

    def wrap_trainer(self, trainer, recipe, callbacks=None):
        """TRL (1.16) casts the LoRA weights of a quantized model to bf16 (the QLoRA paper's choice).

        The recipe's method.compute_dtype is the one source of truth instead: with float32 compute
        (CPU, or for precision) the adapter stays float32, otherwise bf16 matmuls are mixed in.
        Done before training starts: the optimizer does not exist yet.
        """
        import torch

        dtype = getattr(torch, recipe.method.compute_dtype)
        for _, p in trainer.model.named_parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
        return trainer


class LlamaAdapter(PeftMethod):
    """LLaMA-Adapter (adaption prompts with zero-init gates in the top layers)."""

    name = "llama_adapter"
    why_not_mergeable = "LLaMA-Adapter adds a gated attention path over learned prompts, not a weight delta"

    def peft_config(self, cfg, model=None, tokenizer_path=None, task="CAUSAL_LM"):
        from peft import AdaptionPromptConfig

        n = model.config.num_hidden_layers if model is not None else None
        layers = cfg.adapter_layers or n
        if n is not None and layers > n:
            raise UserError(f"method.adapter_layers={layers} but the model has {n} layers",
                            f"set method.adapter_layers to at most {n} (or leave it unset for all layers)")
        return AdaptionPromptConfig(task_type=task, adapter_len=cfg.adapter_len, adapter_layers=layers)

    def wrap_trainer(self, sft, recipe, callbacks=None):
        """A transformers.Trainer over the SFTTrainer's tokenized data, collator and arguments.

        LLaMA-Adapter wraps each attention layer and calls the original forward it captured, so
        TRL 1.16's fused LM-head patch (its loss reads `outputs.log_probs`) never takes effect and
        SFTTrainer fails with AttributeError. TRL still does the data preparation (tokenizing,
        EOS, completion masks); the plain Trainer takes the model's own cross-entropy `loss`, the
        same token-mean over the supervised positions. (Only SFT trains LLaMA-Adapter: the preference
        objectives refuse it in schema/objective.py for the same reason.)
        """
        import dataclasses

        from transformers import Trainer

        return batching.trainer_class(Trainer)(
            model=sft.model, args=dataclasses.replace(sft.args, remove_unused_columns=False),
            train_dataset=sft.train_dataset, eval_dataset=sft.eval_dataset,
            data_collator=sft.data_collator, processing_class=sft.processing_class, callbacks=callbacks)

    def estimate_params(self, shape, m):
        layers = shape.num_layers if m.get("adapter_layers") is None else min(int(m["adapter_layers"]), shape.num_layers)
        return {"adaption_prompt": layers * (int(m["adapter_len"]) * shape.hidden + 1)}, []


class Prefix(PeftMethod):
    """Prefix tuning: learned key/value prefixes in every attention layer."""

    name = "prefix"
    virtual_tokens = True
    why_not_mergeable = "prefix tuning adds learned key/value vectors to every attention layer, not a weight delta"

    def peft_config(self, cfg, model=None, tokenizer_path=None, task="CAUSAL_LM"):
        from peft import PrefixTuningConfig

        kwargs = {}
        if cfg.prefix_projection:
            kwargs["encoder_hidden_size"] = cfg.encoder_hidden_size or model.config.hidden_size
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                  prefix_projection=cfg.prefix_projection, **kwargs)

    def estimate_params(self, shape, m):
        n_tok = int(m["num_virtual_tokens"])
        return {"prefix_encoder": n_tok * shape.num_layers * 2 * shape.kv_heads * shape.head_dim}, []


class PromptTuning(PeftMethod):
    """Prompt tuning: learned input embeddings prepended to every sequence."""

    name = "prompt_tuning"
    virtual_tokens = True
    why_not_mergeable = "prompt tuning prepends learned input embeddings (virtual tokens), not a weight delta"

    def peft_config(self, cfg, model=None, tokenizer_path=None, task="CAUSAL_LM"):
        from peft import PromptTuningConfig

        if cfg.init == "text":
            return PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                      prompt_tuning_init="TEXT", prompt_tuning_init_text=cfg.init_text,
                                      tokenizer_name_or_path=tokenizer_path)
        return PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens,
                                  prompt_tuning_init="RANDOM")

    def estimate_params(self, shape, m):
        return {"prompt_encoder": int(m["num_virtual_tokens"]) * shape.hidden}, []


class IA3(PeftMethod):
    """IA3: learned per-channel scaling vectors."""

    name = "ia3"
    mergeable = True

    def peft_config(self, cfg, model=None, tokenizer_path=None, task="CAUSAL_LM"):
        from peft import IA3Config

        return IA3Config(task_type=task, target_modules=cfg.target_modules,
                         feedforward_modules=cfg.feedforward_modules)

    def estimate_params(self, shape, m):
        ff = set(m.get("feedforward_modules") or [])
        extra = {}
        for t in linear_targets(shape, m.get("target_modules")):
            fin, fout = shape.linears[t]
            extra[f"{t}.ia3_l"] = fin if t.split(".")[-1] in ff else fout
        return extra, []
