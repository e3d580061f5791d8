"""Task heads on a frozen (or LoRA-adapted) base: train, save, load, predict, evaluate.

Two heads, both classifiers over the rows of a `classification` dataset (`text`, `label` as a
`datasets.ClassLabel`):
  classifier_head  AutoModelForSequenceClassification: the `score` layer on the last non-pad token.
  mlp_head         a few FC layers (hidden sizes, activation, dropout) on pooled hidden states
                   (last non-pad token or mean over non-pad tokens) of the base AutoModel.

The artifact never copies the base. OUTPUT_DIR holds:
  head_config.json           always (the marker for "this is a head artifact"): head kind, base
                             reference, label names, head hyper-parameters
  head.safetensors           the head weights (frozen base)
  adapter_config.json + adapter_model.safetensors   with method.lora (the classifier head's
                             `score` is saved inside the adapter, peft#1070; the MLP head stays in
                             head.safetensors next to it)
  tokenizer files, recipe.yaml, metrics.json, trainable_parameters.json

Heads train with the plain `transformers.Trainer` (TRL's SFTTrainer is for causal LM), through
the same lifecycle as every method (pipeline.train; methods/heads.py says how).
torch is imported inside the functions, and the MLP head's nn.Module class is built on first use
(`mlp_head_class`): the method registry imports this module, and `--estimate-memory` imports the
registry, so importing it must not import torch (1 s of the estimate's 2 s budget).
"""
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_recipes import data, formats, measure, modeling
from llama_recipes.errors import UserError, damaged_weights, read_json
from llama_recipes.log import get_logger, is_main_process
from llama_recipes.paths import PREFIX
from llama_recipes.runtime import collectives
from llama_recipes.schema.model import ModelConfig

log = get_logger(__name__)

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "head.safetensors"


# -- the MLP head ------------------------------------------------------------------------------

def pool(hidden, attention_mask, how: str):
    """(batch, seq, hidden) -> (batch, hidden): the last non-pad position, or the mean over non-pad ones.

    Works for right and left padding (the last position whose mask is 1)."""
    import torch

    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device)
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def build_mlp(in_features: int, num_labels: int, hidden_sizes, activation: str, dropout: float):
    """nn.Sequential: (dropout, linear, activation) per hidden size, then dropout and the output linear."""
    from torch import nn

    act = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden_sizes:
        layers += [nn.Dropout(dropout), nn.Linear(width, h), act()]
        width = h
    layers += [nn.Dropout(dropout), nn.Linear(width, num_labels)]
    return nn.Sequential(*layers)


@functools.cache
def mlp_head_class() -> type:
    """The MLP head's nn.Module class (one class per process, built on first use: see the module docstring)."""
    from torch import nn

    class MLPHeadClassifier(nn.Module):
        """base (AutoModel: hidden states) -> pool -> MLP (fp32) -> logits; loss = cross-entropy on `labels`."""

        def __init__(self, base, cfg: dict):
            super().__init__()
            self.base = base
            self.pooling, self.layer = cfg["pooling"], cfg["layer"]
            n = base.config.num_hidden_layers  # hidden_states holds the embeddings and one entry per layer
            if not -(n + 1) <= self.layer <= n:
                raise UserError(f"method.layer={self.layer}: this model has {n} layers, so the hidden states are "
                                f"0 (embeddings) to {n} (or -1 to -{n + 1} from the end)",
                                f"set method.layer in -{n + 1}..{n}")
            self.head = build_mlp(cfg["hidden_size"], cfg["num_labels"], cfg["hidden_sizes"], cfg["activation"],
                                  cfg["dropout"])

        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            from transformers.modeling_outputs import SequenceClassifierOutput

            logits = head_logits(self, pooled_features(self, input_ids, attention_mask))
            loss = head_loss(self, logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

        def activation_checkpointing_enable(self, **kwargs):  # the Trainer calls this when asked to checkpoint
            self.base.activation_checkpointing_enable(**kwargs)

    MLPHeadClassifier.__module__ = __name__
    return MLPHeadClassifier


def is_mlp_head(model) -> bool:
    """True for the MLP head (base + FC layers), False for AutoModelForSequenceClassification."""
    return isinstance(model, mlp_head_class())


# -- a head = features of the base (pooled) -> head layers --------------------------------------
# The two halves of both heads' forward, so that training on cached features computes exactly what
# the full forward computes.

def pooled_features(model, input_ids, attention_mask):
    """(batch, hidden) in the base's output dtype: what the head layers read."""
    import torch

    if is_mlp_head(model):
        out = model.base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=model.layer != -1)
        hidden = out.last_hidden_state if model.layer == -1 else out.hidden_states[model.layer]
        return pool(hidden, attention_mask, model.pooling)
    # AutoModelForSequenceClassification (transformers 5.24 GenericForSequenceClassification.forward):
    # `score` on the rightmost token that is not the pad token (by id, not by the attention mask).
    hidden = getattr(model, model.base_model_prefix)(input_ids, attention_mask=attention_mask).last_hidden_state
    pad = model.config.get_text_config().pad_token_id
    non_pad = (input_ids != pad).to(hidden.device, torch.int32)
    last = (torch.arange(input_ids.shape[-1], device=hidden.device, dtype=torch.int32) * non_pad).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def head_logits(model, features):
    """Logits (fp32) of the head layers on pooled features."""
    if is_mlp_head(model):
        return model.head(features.float())
    return model.score(features)  # a pre-hook casts the input to the fp32 head's dtype


def head_loss(model, logits, labels):
    if is_mlp_head(model):
        from torch import nn

        return nn.functional.cross_entropy(logits, labels.to(logits.device))
    return model.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=model.config)


# -- frozen base: compute the features once ------------------------------------------------------

def why_not_cached(model, lora, args) -> str:
    """'' when training on cached features computes what training the whole model computes; else why not."""
    from torch import nn

    if lora is not None:
        return "method.lora trains the base"
    head = model.head if is_mlp_head(model) else getattr(model, "score", None)
    if head is None:
        return "unknown head"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable - {id(p) for p in head.parameters()}:
        return "parameters of the base train"
    base = model.base if is_mlp_head(model) else getattr(model, model.base_model_prefix)
    # The Trainer runs the whole model in train mode; the cached features come from eval mode. The
    # two agree only when the base has no active dropout.
    dropouts = [f"{name}={v}" for name, v in vars(base.config.get_text_config()).items()
                if "dropout" in name and isinstance(v, float) and v > 0]
    dropouts += [n for n, m in base.named_modules() if isinstance(m, nn.Dropout) and m.p > 0][:1]
    if dropouts:
        return f"the base has dropout ({dropouts[0]}): its features differ from step to step"
    if collectives.rank_world()[1] > 1:
        return "several processes (the head would train outside the DDP/FSDP-wrapped forward)"
    if args.train_sampling_strategy not in ("random", "sequential"):
        return f"training.train_sampling_strategy={args.train_sampling_strategy}"
    return ""


class FeatureRows:
    """Cached pooled features and labels, one row per training example, in the dataset's order."""

    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"features": self.features[i], "labels": self.labels[i]}


def compute_features(model, dataset, collator, batch_size: int, autocast) -> FeatureRows:
    """Pooled features of every row of a tokenized dataset, base in eval mode, no grad, once."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(x) for x in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])  # longest first: less padding
    features = [None] * len(dataset)
    try:
        with torch.no_grad(), autocast:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collator([dataset[i] for i in idx])
                pooled = pooled_features(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                for i, f in zip(idx, pooled.cpu()):
                    features[i] = f
    finally:
        model.train(was_training)
    return FeatureRows(torch.stack(features), torch.as_tensor(dataset["label"]))


class HeadCollator:
    """Tokenized rows -> a padded batch (transformers' DataCollatorWithPadding); cached feature rows -> stacked."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, rows):
        import torch

        if "features" in rows[0]:
            return {"features": torch.stack([r["features"] for r in rows]),
                    "labels": torch.as_tensor([int(r["labels"]) for r in rows])}
        return self.pad(rows)


class CachedFeaturesMixin:
    """Mixed into the head's Trainer when the base is frozen: the base runs once, the head trains on its output.

    The features are computed when training starts (the first `get_train_dataloader`) and kept in
    memory for the run. Steps see the rows in the same order as without the cache (same length,
    same sampler), and the head computes exactly what the full forward computes after the base.
    """

    _feature_rows = None
    feature_seconds = 0.0

    def get_train_dataloader(self):
        if self._feature_rows is None:
            started = time.perf_counter()
            self._feature_rows = compute_features(self.model, self.train_dataset, self.data_collator,
                                                  self.args.per_device_eval_batch_size, measure.autocast(self.args))
            self.feature_seconds = time.perf_counter() - started  # outside the Trainer's train_runtime
            log.info("method.cache_features: the frozen base ran once over %d examples (%.1f s); the head trains "
                     "on their features", len(self.train_dataset), self.feature_seconds)
        return self._get_dataloader(dataset=self._feature_rows, description="Training",
                                    batch_size=self._train_batch_size, sampler_fn=self._get_train_sampler,
                                    is_training=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "features" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from transformers.modeling_outputs import SequenceClassifierOutput

        m = self.accelerator.unwrap_model(model)
        logits = head_logits(m, inputs["features"])
        loss = head_loss(m, logits, inputs["labels"])
        return (loss, SequenceClassifierOutput(loss=loss, logits=logits)) if return_outputs else loss


# -- building the model ------------------------------------------------------------------------

def _base_ref(name_or_path: str) -> str:
    """What head_config.json records: builtin: and hub ids as written, local directories absolute."""
    p = Path(name_or_path).expanduser()
    return name_or_path if name_or_path.startswith(PREFIX) or not p.exists() else str(p.resolve())


def _lora_config(lora, task_type: str):
    from peft import LoraConfig

    # modules_to_save: the classifier head trains in full and is saved inside the adapter (peft#1070).
    return LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, modules_to_save=["score"] if task_type == "SEQ_CLS" else None)


def head_config(recipe, labels: list[str], pad_token_id: int, hidden_size: int) -> dict:
    m, model = recipe.method, recipe.model
    cfg = {"format_version": 1, "method": m.name, "base_model": _base_ref(model.name_or_path),
           "base_gguf_file": model.gguf_file, "base_revision": model.revision, "dtype": model.dtype,
           "attn_implementation": model.attn_implementation,
           "labels": list(labels), "num_labels": len(labels), "pad_token_id": pad_token_id,
           "hidden_size": hidden_size, "max_length": getattr(recipe.training, "max_length", None),
           "lora": m.lora.model_dump() if m.lora else None}
    if m.name == "mlp_head":
        cfg.update(hidden_sizes=m.hidden_sizes, activation=m.activation, dropout=m.dropout, pooling=m.pooling,
                   layer=m.layer)
    return cfg


def _load_base(cfg: dict):
    """The base model a head sits on, with every parameter frozen."""
    mcfg = ModelConfig(name_or_path=cfg["base_model"], gguf_file=cfg.get("base_gguf_file"),
                       revision=cfg["base_revision"], dtype=cfg["dtype"],
                       attn_implementation=cfg["attn_implementation"])
    from transformers.utils import logging as hf_logging

    labels = cfg["labels"]
    # transformers reports lm_head as unused and score as newly initialised: both expected here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if cfg["method"] == "classifier_head":
            model = modeling.load_model(mcfg, "AutoModelForSequenceClassification", num_labels=len(labels),
                                        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
        else:
            model = modeling.load_model(mcfg, "AutoModel")
    finally:
        hf_logging.set_verbosity(verbosity)
    # Llama checkpoints often have no pad token; the classifier finds the last real token through it.
    model.config.pad_token_id = cfg["pad_token_id"]
    model.requires_grad_(False)
    return model


def _cast_inputs_to_weight(module, args):
    import torch

    return tuple(a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def build(cfg: dict, lora=None):
    """Frozen base (+ LoRA) + a freshly initialised head, from a head config."""
    base = _load_base(cfg)
    if cfg["method"] == "classifier_head":
        model = base
        model.score.float().requires_grad_(True)  # the head trains in fp32 even on a bf16 base
        model.score.register_forward_pre_hook(_cast_inputs_to_weight)
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, _lora_config(lora, "SEQ_CLS"))
        return model
    if lora is not None:
        from peft import get_peft_model

        base = get_peft_model(base, _lora_config(lora, "FEATURE_EXTRACTION"))
    return mlp_head_class()(base, cfg)


def head_state(model) -> dict:
    """The head's weights (what head.safetensors holds). Collective under FSDP2: call on every rank."""
    prefix, module = ("head", model.head) if is_mlp_head(model) else ("score", model.score)

    def full(v):  # an FSDP2-sharded parameter is a DTensor: gather it whole
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous().cpu()

    return {f"{prefix}.{k}": full(v) for k, v in module.state_dict().items()}


# -- save / load / predict ---------------------------------------------------------------------

def save(model, tokenizer, cfg: dict, out: Path) -> None:
    """Write the head artifact (see the module docstring); never a copy of the base."""
    from safetensors.torch import save_file

    adapter_with_head = cfg["lora"] and cfg["method"] == "classifier_head"
    state = None if adapter_with_head else head_state(model)  # on every rank (FSDP gathers)
    if not is_main_process():
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / HEAD_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    if adapter_with_head:
        model.save_pretrained(str(out))  # adapter + `score` (modules_to_save) in adapter_model.safetensors
    else:
        if cfg["lora"]:
            model.base.save_pretrained(str(out))
        save_file(state, str(out / HEAD_WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))


@dataclass
class HeadModel:
    """A loaded head artifact: `logits(texts)`, `predict(texts)` -> label names."""

    model: Any
    tokenizer: Any
    config: dict

    @property
    def labels(self) -> list[str]:
        return self.config["labels"]

    def logits(self, texts: list[str], batch_size: int = 32):
        return batch_logits(self.model, self.tokenizer, texts, batch_size, self.config.get("max_length"))

    def predict(self, texts: list[str], batch_size: int = 32) -> list[str]:
        return [self.labels[i] for i in self.logits(texts, batch_size).argmax(-1).tolist()]


def is_head_artifact(path) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


def load(path) -> HeadModel:
    """Load a head artifact written by `save` (base from its reference + head weights), in eval mode."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not is_head_artifact(path):
        raise UserError(f"{path} is not a head artifact (no {HEAD_CONFIG})", "point at the output_dir of a head recipe")
    cfg = read_json(path / HEAD_CONFIG)
    missing = [k for k in ("method", "base_model", "labels", "dtype", "lora") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise UserError(f"{path / HEAD_CONFIG} lacks {', '.join(missing)}: not a head artifact this version wrote",
                        "retrain the head recipe, or point at an intact output_dir")
    model = build(cfg)
    with damaged_weights(path, "head"):
        model = _load_weights(model, cfg, path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    model.head_config = cfg
    return HeadModel(model, tokenizer, cfg)


def _load_weights(model, cfg: dict, path: Path):
    """The trained weights into `model` (built from head_config.json); returns the model to use."""
    from safetensors.torch import load_file

    if cfg["lora"] and cfg["method"] == "classifier_head":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path))
    else:
        if cfg["lora"]:
            from peft import PeftModel

            model.base = PeftModel.from_pretrained(model.base, str(path))
        state = load_file(str(path / HEAD_WEIGHTS))
        target = model.head if is_mlp_head(model) else model.score
        prefix = "head." if is_mlp_head(model) else "score."
        target.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, strict=True)
    return model


def tokenize(ds, tokenizer, max_length: int | None):
    """text -> input_ids/attention_mask (label kept); padding is the collator's job."""
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
                  batched=True, remove_columns=["text"])


def batch_logits(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int | None = None):
    """(len(texts), num_labels) fp32 logits; right padding, truncation to max_length."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                                truncation=max_length is not None, max_length=max_length).to(device)
                out.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(out) if out else torch.empty(0)


def predict(path_or_model, texts: list[str]) -> list[str]:
    """Label names for `texts` from a head artifact directory (or an already loaded HeadModel)."""
    head = path_or_model if isinstance(path_or_model, HeadModel) else load(path_or_model)
    return head.predict(texts)


# -- metrics -----------------------------------------------------------------------------------

def classification_metrics(preds: list[int], refs: list[int], num_labels: int, labels: list[str] | None = None) -> dict:
    """accuracy, macro F1 (a class never predicted nor present is left out) and the confusion matrix (rows: true),
    with `labels`, the label names in id order, that label its rows and columns."""
    cm = [[0] * num_labels for _ in range(num_labels)]
    for p, r in zip(preds, refs):
        cm[r][p] += 1
    f1s = []
    for c in range(num_labels):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(num_labels)) - tp
        fn = sum(cm[c]) - tp
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    n = len(refs)
    return {"accuracy": sum(cm[c][c] for c in range(num_labels)) / max(n, 1),
            "macro_f1": sum(f1s) / max(len(f1s), 1), "confusion_matrix": cm, "examples": n,
            "labels": list(labels) if labels else [str(i) for i in range(num_labels)]}


def evaluate_model(model, tokenizer, ds, batch_size: int = 32, max_length: int | None = None,
                   limit: int | None = None) -> dict:
    """Classification metrics of a model on a `text`/`label` dataset; plus the majority-class baseline."""
    n = min(len(ds), limit or len(ds))
    rows = ds.select(range(n))
    num_labels = len(ds.features["label"].names)
    logits = batch_logits(model, tokenizer, rows["text"], batch_size, max_length)
    result = classification_metrics(logits.argmax(-1).tolist(), rows["label"], num_labels, ds.features["label"].names)
    counts = [rows["label"].count(c) for c in range(num_labels)]
    result["majority_baseline"] = max(counts) / max(n, 1)
    return result


def check_labels(train_ds, eval_ds, fmt: str) -> list[str]:
    """The label names of a classification dataset (train and eval must agree)."""
    import datasets

    if not getattr(formats.REGISTRY.get(fmt), "labels", False) or not isinstance(train_ds.features.get("label"), datasets.ClassLabel):
        raise UserError(f"head methods need classification data (text + label), got data.format {fmt!r}",
                        "set data.format: classification (and data.columns if your columns are not text/label)")
    labels = train_ds.features["label"].names
    if eval_ds is not None and eval_ds.features["label"].names != labels:
        raise UserError(f"the eval split's labels {eval_ds.features['label'].names} differ from training's {labels}",
                        "make both splits use the same label set")
    return labels


def evaluate_artifact(recipe, path, limit: int | None = None) -> dict:
    """accuracy, macro_f1, confusion_matrix (+ majority_baseline) of a head artifact on the recipe's eval split."""
    head = load(path)
    train_ds, eval_ds, fmt = data.build_datasets(recipe.data, recipe.formats)
    labels = check_labels(train_ds, eval_ds, fmt)
    if eval_ds is None:
        raise UserError("no eval split to evaluate on", "set data.eval_split (a split name or a fraction)")
    if labels != head.labels:
        raise UserError(f"the artifact's labels {head.labels} differ from the data's {labels}",
                        "evaluate on data with the labels the head was trained on")
    return evaluate_model(head.model, head.tokenizer, eval_ds, recipe.eval.batch_size, head.config.get("max_length"),
                          limit if limit is not None else recipe.eval.limit)
