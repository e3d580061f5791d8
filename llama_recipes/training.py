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


# Above this many logits (positions x vocabulary) the compact head leaves TRL's chunked one in place:
# the compact head keeps its [positions, vocab] logits for backward (256M fp32 values: 1 GiB).
COMPACT_HEAD_MAX_LOGITS = 256 * 2**20
# Config keys that change a causal LM's logits beyond its output projection: TRL's head handles them.
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")


class CompactLogProbsMixin:
    """Mixed into the preference trainers on CPU: log-probabilities of the completion tokens only.

    TRL 1.16 patches the model with a fused LM head (`add_fused_lm_head`): `model(..., labels=...,
    fused_lm_head=True)` returns per-token log-probabilities. Without Triton (on CPU) it projects
    EVERY position through the vocabulary, prompt and padding included, in chunks, and projects them
    again in backward. A preference batch supervises its completions only (often a few tokens after a
    long prompt), so on CPU we re-patch that head to project only the positions with a label, once,
    keeping those logits for backward. Same log-probabilities, entropy, mean logits and top-1 flags at
    the supervised positions (zero elsewhere, as TRL's compact path returns them); everything else
    (models with scaled or soft-capped logits, router losses, pre-shifted labels, more than
    COMPACT_HEAD_MAX_LOGITS logits in a batch) goes through TRL's head unchanged.
    docs/benchmarks.md ("DPO: ours vs TRL") has the measured effect.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from peft import PeftModel

        policy = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        for model in (policy, getattr(self, "ref_model", None)):
            if _has_trl_fused_head(model):  # DPO and KTO patch one; ORPO, CPO and reward models do not
                compact_fused_head(model)


def _has_trl_fused_head(model) -> bool:
    forward = vars(model).get("forward") if model is not None else None  # TRL sets it on the instance
    return getattr(getattr(forward, "__func__", None), "__code__", None) is not None and \
        forward.__func__.__code__.co_name == "_fused_forward"


def compact_fused_head(model) -> None:
    """Wrap TRL's fused LM head on `model` (see CompactLogProbsMixin)."""
    import types

    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from trl.trainer.utils import FusedCausalLMOutput

    fused = model.forward
    config = model.config.get_text_config()
    if any(getattr(config, key, None) is not None for key in _SCALED_LOGITS) or getattr(
            config, "output_router_logits", False):
        return

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        head = self.get_output_embeddings()
        if (not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits")
                or (labels[:, 1:] != -100).sum() * head.weight.shape[0] > COMPACT_HEAD_MAX_LOGITS):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        tree = None if args else shared_prompt_rows(kwargs, labels)
        if tree is None:
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
            scored = hidden[labels[:, 1:] != -100]
        else:  # chosen and rejected after one pass over their prompt
            ids, positions, allowed, index = tree
            dtype = self.get_input_embeddings().weight.dtype
            mask4d = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            hidden = self.base_model(input_ids=ids, attention_mask=mask4d[:, None], position_ids=positions,
                                     use_cache=False).last_hidden_state
            scored = hidden.reshape(-1, hidden.shape[-1])[index]
        labels = labels[:, 1:].to(head.weight.device)
        mask = labels != -100
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2: the full head, as TRL's does
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        logits = F.linear(scored.to(weight.device), weight, bias).float()
        logp = logits.log_softmax(-1)
        target = labels[mask]
        log_probs = logp.gather(-1, target[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
            log_sum_sq = torch.logsumexp(2 * logp, dim=-1)
            mean_logits = logits.mean(-1)
            top1 = logits.argmax(-1) == target  # the first maximum, as TRL breaks ties

        def full(x):  # masked_scatter keeps an all-masked batch connected to the graph, as TRL's does
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = full(log_probs)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=full(entropy),
                                   log_sum_sq_probs=full(log_sum_sq), mean_logits=full(mean_logits),
                                   is_top1=full(top1), label_mask=mask)

    model.forward = types.MethodType(forward, model)


def shared_prompt_rows(kwargs: dict, labels):
    """DPO's batch as one row per pair: the prompt once, then the chosen and the rejected completion.

    TRL's DPO batch holds each pair twice, rows i (prompt + chosen) and i + B (prompt + rejected), right
    padded, labels -100 on the prompt: the prompt is computed twice, and it is most of a row when the
    answers are short. Here each pair becomes one row `prompt, chosen, rejected`; the rejected tokens
    attend to the prompt and to themselves, never to the chosen ones, and keep the position ids they
    have in TRL's rows, so every completion token sees exactly what it sees there (only the order of
    floating-point sums differs). Returns (input_ids, position_ids, allowed [B, T, T] bool, index: the
    flat positions of the new rows whose hidden states predict each label, in the order of the labels
    of TRL's rows), or None when the batch is not such pairs (the caller then runs the rows as given):
    an odd row count, other model inputs, a row that is not prompt-completion-padding, a pair whose
    prompts differ, or an empty prompt.
    """
    import torch

    given = {k for k, v in kwargs.items() if v is not None and v is not False}  # PEFT passes None for the rest
    if given - {"input_ids", "attention_mask", "use_cache", "return_dict"} or "attention_mask" not in given:
        return None
    ids, attn = kwargs["input_ids"], kwargs["attention_mask"].bool()
    rows = ids.shape[0]
    if rows % 2 or labels is None or labels.shape != ids.shape:
        return None
    lengths = attn.sum(1)
    supervised = labels != -100
    prompt = (~supervised).int().cumprod(1).sum(1).clamp(max=lengths)  # leading unsupervised tokens
    col = torch.arange(ids.shape[1])
    expected = attn & (col[None] < lengths[:, None])
    if not torch.equal(attn, expected) or not torch.equal(supervised, expected & (col[None] >= prompt[:, None])):
        return None  # not [prompt, completion, padding] rows
    half = rows // 2
    if not torch.equal(prompt[:half], prompt[half:]) or bool((prompt[:half] == 0).any()):
        return None
    for i in range(half):
        if not torch.equal(ids[i, :prompt[i]], ids[half + i, :prompt[i]]):
            return None
    p, c, r = prompt[:half].tolist(), (lengths[:half] - prompt[:half]).tolist(), (lengths[half:] - prompt[half:]).tolist()
    width = max(a + b + d for a, b, d in zip(p, c, r))
    new_ids = torch.zeros(half, width, dtype=ids.dtype)
    positions = torch.zeros(half, width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(half, 1, 1)  # padding attends to itself only (no NaN)
    chosen_index, rejected_index = [], []
    for i in range(half):
        n = p[i] + c[i] + r[i]
        new_ids[i, :p[i] + c[i]] = ids[i, :p[i] + c[i]]
        new_ids[i, p[i] + c[i]:n] = ids[half + i, p[i]:p[i] + r[i]]
        positions[i, :p[i] + c[i]] = torch.arange(p[i] + c[i])
        positions[i, p[i] + c[i]:n] = torch.arange(p[i], p[i] + r[i])
        allowed[i, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[i, p[i] + c[i]:n, p[i]:p[i] + c[i]] = False  # rejected never sees chosen
        base = i * width
        # the label at column t of TRL's row is predicted by the hidden state at t - 1; the first completion
        # token of both sides by the prompt's last token
        chosen_index += [base + p[i] - 1 + k for k in range(c[i])]
        rejected_index += [base + (p[i] - 1 if k == 0 else p[i] + c[i] + k - 1) for k in range(r[i])]
    device = ids.device
    return (new_ids.to(device), positions.to(device), allowed.to(device),
            torch.tensor(chosen_index + rejected_index, dtype=torch.long, device=device))
