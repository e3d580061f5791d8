"""Pre-flight memory estimate: will this recipe fit, and if not, what would make it fit.

    python run_recipe.py RECIPE --estimate-memory [--gpus N] [--gpu-memory 80GB] [--config ACCEL.yaml] [--compare]

Reads only the model's config.json and the recipe; no weight is loaded. Llama-family models
(llama, mistral, qwen2, qwen3) are counted from config.json alone, without importing torch or
transformers; any other architecture is built on the meta device. Either way every parameter is
counted exactly. Never imports trl, peft or bitsandbytes. Per device, in bytes:

  weights      every parameter at its storage dtype (QLoRA: 4-bit NF4 + quantization constants)
  gradients    trainable parameters, at the parameter dtype
  optimizer    per trainable parameter: AdamW 2 states at the parameter dtype, 8-bit Adam 2 bytes, ...
  activations  tensors autograd keeps for backward at micro-batch x max_length (with and without
               activation checkpointing), plus the logits and the loss's log-softmax
  buffers      FSDP all-gather of the largest unit (x2 for prefetch) and its unsharded gradient,
               or DDP's gradient buckets

The formulas are documented in docs/memory.md; tests/test_memory.py checks weights, gradients
and optimizer states against tensor bytes after a real optimizer step.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from llama_recipes import builtin_models, methods, objectives
from llama_recipes.errors import UserError, read_json
from llama_recipes.freeze import rule_matches
from llama_recipes.methods.peft import Lora, linear_targets
from llama_recipes.paths import resolve, shipped_config
from llama_recipes.runtime import launchplan
from llama_recipes.schema.freeze import ParamRule
from llama_recipes.schema.method import METHOD_MODELS, method_defaults

GiB = 2**30
USABLE = 0.95  # of the card: the rest is the CUDA context and allocator fragmentation
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 with double quantization (what QLoRA uses): 4 bits per weight, one 8-bit absmax per 64
# weights, one fp32 scale per 256 absmax blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)

# The methods --compare puts side by side (name, settings).
COMPARE = [
    ("full", {"name": "full"}),
    ("partial (top 25% layers)", {"name": "partial"}),
    ("classifier head (frozen base)", {"name": "classifier_head"}),
    ("lora r16 all-linear", {"name": "lora", "r": 16}),
    ("dora r16 all-linear", {"name": "lora", "r": 16, "use_dora": True}),
    ("qlora r16 all-linear", {"name": "qlora", "r": 16}),
    ("ia3", {"name": "ia3"}),
    ("prefix (20 tokens)", {"name": "prefix"}),
    ("prompt tuning (20)", {"name": "prompt_tuning"}),
    ("llama_adapter", {"name": "llama_adapter"}),
]


# ---------------------------------------------------------------------------------------------
# The model, counted on the meta device
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    """Every parameter (name -> shape), every linear layer, and the sizes activations depend on."""

    params: dict[str, tuple[int, ...]]
    linears: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    layer_prefix: str  # e.g. "model.layers."
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: str  # the checkpoint's dtype (what dtype: auto loads)
    module_classes: set[str] = field(default_factory=set)  # class names of every module (FSDP wrap checks)
    no_split: list[str] = field(default_factory=list)  # the model's _no_split_modules (FSDP's layer class)

    @property
    def total(self) -> int:
        return sum(math.prod(s) for s in self.params.values())

    def layer_of(self, name: str) -> int | None:
        if not name.startswith(self.layer_prefix):
            return None
        return int(name[len(self.layer_prefix):].split(".")[0])

    def unit_sizes(self) -> list[int]:
        """Parameter counts of the FSDP units: one per decoder layer, then the root (the rest)."""
        per = [0] * self.num_layers
        rest = 0
        for n, s in self.params.items():
            i = self.layer_of(n)
            if i is None:
                rest += math.prod(s)
            else:
                per[i] += math.prod(s)
        return per + [rest]


def config_file(ref: str, revision: str | None = None) -> Path:
    """The model's config.json, found without importing transformers: a local directory (or
    builtin:), the HF cache, the package's copy for the models shipped recipes name (their
    published config.json: shapes do not change between revisions), else downloaded from the hub
    (config.json only). The cache and the shipped copy come first so that an estimate never waits
    on the network (offline, huggingface_hub retries for ~23 s before it gives up)."""
    path = resolve(ref, "model")
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            raise UserError(f"{ref}: no config.json in {local}", "point model.name_or_path at a model directory "
                            "(the one save_pretrained wrote)")
        return local / "config.json"
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    shipped = shipped_config(path)
    if shipped is not None and revision is None:
        return shipped / "config.json"
    try:
        return Path(hf_hub_download(path, "config.json", revision=revision))
    except (OSError, ValueError, EntryNotFoundError) as e:  # offline, gated, no such repo or file, a malformed id
        raise UserError(f"cannot read the model config of {ref!r}: {str(e).splitlines()[0]}",
                        "point model.name_or_path at a local directory with config.json, or go online once "
                        "for a hub id (only config.json is read)") from None


def load_config(ref: str, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config object of a model (for the meta-device shape)."""
    from transformers import AutoConfig

    if trust_remote_code:
        print(f"warning: trust_remote_code is on: running Python code shipped with {ref}", file=sys.stderr)
        source = resolve(ref, "model")  # the remote code is fetched next to config.json
    else:
        source = str(config_file(ref, revision).parent)
    try:
        return AutoConfig.from_pretrained(source, revision=revision if trust_remote_code else None,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{ref} ships its own Python code (auto_map in its config), and model.trust_remote_code "
                            "is false", "read that code; if you trust its authors set model.trust_remote_code: "
                            "true") from None
        raise UserError(f"cannot read the model config of {ref!r}: {str(e).splitlines()[0]}",
                        "point model.name_or_path at a local directory with config.json, or go online once "
                        "for a hub id (only config.json is read)") from None


# Architectures whose parameters follow from config.json alone (no torch, no transformers): the
# Llama layout. Per family: transformers 5.24's class defaults for keys a config.json may omit,
# whether q/k/v (and o) carry a bias, and per-head q/k norms (Qwen3). tests/test_memory.py checks
# every family against the meta-device model, with these defaults and with every key explicit.
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "tie_word_embeddings")
FAMILIES: dict[str, dict] = {
    "llama": {"defaults": (32000, 4096, 11008, 32, 32, None, None, False), "qkv_bias": "attention_bias",
              "o_bias": "attention_bias", "mlp_bias": "mlp_bias", "qk_norm": False},
    "mistral": {"defaults": (32000, 4096, 14336, 32, 32, 8, None, False), "qkv_bias": False, "o_bias": False,
                "mlp_bias": False, "qk_norm": False},
    "qwen2": {"defaults": (151936, 4096, 22016, 32, 32, 32, None, False), "qkv_bias": True, "o_bias": False,
              "mlp_bias": False, "qk_norm": False},
    "qwen3": {"defaults": (151936, 4096, 22016, 32, 32, 32, 128, False), "qkv_bias": "attention_bias",
              "o_bias": "attention_bias", "mlp_bias": False, "qk_norm": True},
}


def config_shape(raw: dict) -> ModelShape | None:
    """The shape of a Llama-family model from its config.json contents, or None for another architecture."""
    family = FAMILIES.get(raw.get("model_type"))
    if family is None or "auto_map" in raw:
        return None
    c = {k: raw.get(k, d) for k, d in zip(_LLAMA_KEYS, family["defaults"])}
    heads, hidden, inter = c["num_attention_heads"], c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] or heads
    hd = c["head_dim"] or hidden // heads

    def flag(v):  # a family's fixed choice, or the config key that decides it (default False)
        return v if isinstance(v, bool) else bool(raw.get(v, False))

    linears = {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd),
               "o_proj": (heads * hd, hidden)}
    mlp = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    params: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], hidden)}
    shape_linears: dict[str, tuple[int, int]] = {}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, (fin, fout) in linears.items():
            shape_linears[f"{p}self_attn.{name}"] = (fin, fout)
            params[f"{p}self_attn.{name}.weight"] = (fout, fin)
            if flag(family["o_bias"] if name == "o_proj" else family["qkv_bias"]):
                params[f"{p}self_attn.{name}.bias"] = (fout,)
        if family["qk_norm"]:
            params[f"{p}self_attn.q_norm.weight"] = (hd,)
            params[f"{p}self_attn.k_norm.weight"] = (hd,)
        for name, (fin, fout) in mlp.items():
            shape_linears[f"{p}mlp.{name}"] = (fin, fout)
            params[f"{p}mlp.{name}.weight"] = (fout, fin)
            if flag(family["mlp_bias"]):
                params[f"{p}mlp.{name}.bias"] = (fout,)
        params[f"{p}input_layernorm.weight"] = (hidden,)
        params[f"{p}post_attention_layernorm.weight"] = (hidden,)
    params["model.norm.weight"] = (hidden,)
    if not c["tie_word_embeddings"]:  # tied, lm_head's weight is embed_tokens' (counted once)
        params["lm_head.weight"] = (c["vocab_size"], hidden)
    shape_linears["lm_head"] = (hidden, c["vocab_size"])
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return ModelShape(params=params, linears=shape_linears, layer_prefix="model.layers.",
                      num_layers=c["num_hidden_layers"], hidden=hidden, intermediate=inter, heads=heads, kv_heads=kv,
                      head_dim=hd, vocab=c["vocab_size"], dtype=str(dtype).replace("torch.", ""))


def meta_shape(cfg, trust_remote_code: bool = False) -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and record its parameters, and
    the module classes FSDP's wrap checks need. Any architecture transformers builds."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # trust_remote_code passed on: left unset, transformers asks on stdin
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    params, seen = {}, set()
    for n, p in model.named_parameters():  # tied weights appear once
        if id(p) not in seen:
            seen.add(id(p))
            params[n] = tuple(p.shape)
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    layers = [n for n, m in model.named_modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) == cfg.num_hidden_layers]
    prefix = (layers[0] + ".") if layers else "model.layers."
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    return ModelShape(
        params=params, linears=linears, layer_prefix=prefix, num_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
        heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab=cfg.vocab_size, dtype=str(dtype).replace("torch.", ""),
        module_classes={type(m).__name__ for m in model.modules()},
        no_split=list(getattr(model, "_no_split_modules", None) or []),
    )


def model_shape(cfg, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model config (a transformers config object): from its keys alone for the
    Llama family, else on the meta device."""
    if not trust_remote_code:
        shape = config_shape(cfg.to_dict())
        if shape is not None:
            return shape
    return meta_shape(cfg, trust_remote_code)


def recipe_shape(m) -> ModelShape:
    """The shape of a recipe's `model:` section. Llama-family models are counted from config.json
    without importing torch or transformers (the estimate answers in about 0.3 s); other
    architectures, remote code and a GGUF not yet converted are built on the meta device."""
    src = builtin_models.gguf_source(m)
    ref, revision = m.name_or_path, m.revision
    if src is not None:
        done = builtin_models.converted_dir(src)
        if not builtin_models.is_converted(done):  # the GGUF's metadata, read by transformers
            return meta_shape(builtin_models.gguf_config(m))
        ref, revision = str(done), None
    if not m.trust_remote_code:
        shape = config_shape(read_json(config_file(ref, revision), "restore the model's config.json"))
        if shape is not None:
            return shape
    return meta_shape(load_config(ref, revision, m.trust_remote_code), m.trust_remote_code)


# ---------------------------------------------------------------------------------------------
# What the recipe trains, in which precision, with which optimizer, sharded how
# ---------------------------------------------------------------------------------------------
@dataclass
class Setup:
    method: dict  # recipe.method as plain data (name + settings)
    freeze_train: list[str] = field(default_factory=list)
    freeze_freeze: list[str] = field(default_factory=list)
    weight_dtype: str = "float32"  # dtype the base weights are loaded in
    mixed: str | None = "bf16"  # autocast dtype (bf16/fp16) or None
    optim: str = "adamw_torch"
    micro_batch: int = 1
    seq_len: int = 1024
    checkpointing: bool = False
    gpus: int = 1
    sharding: str = "none"  # none | full_shard | shard_grad_op | no_shard (FSDP) ; DDP is none with gpus>1
    offload: bool = False  # FSDP CPU offload of params, grads and optimizer states (DeepSpeed: offload_param)
    offload_optimizer: bool = False  # DeepSpeed ZeRO-Offload: optimizer states (and its step) in host RAM
    backend: str = "none"  # fsdp | deepspeed | none: who shards, and so in which dtypes state is kept
    gpu_memory: float | None = None  # bytes
    sequences: int = 1  # sequences per data row in a batch (preference pairs: chosen + rejected)
    reference: bool = False  # a frozen copy of the base as the reference model (DPO/KTO, not PEFT, not precomputed)

    @property
    def base_name(self) -> str:
        """The method, with QLoRA and DoRA counted as the LoRA they are (one parameter formula)."""
        n = self.method["name"]
        return "lora" if isinstance(methods.REGISTRY.get(n), Lora) else n

    def section(self) -> dict:
        """The method section with the schema's defaults filled in (what a recipe would train)."""
        name = self.method["name"]
        if name not in METHOD_MODELS:
            raise UserError(f"the memory estimate does not know method {name!r}",
                            f"estimate one of: {', '.join(sorted(METHOD_MODELS))}")
        return method_defaults(name, self.method)

    @property
    def quantized(self) -> bool:
        m = self.method
        method = methods.REGISTRY.get(m["name"])
        return bool(method and method.quantized) or bool(m.get("load_in_4bit") or m.get("quantize") in ("4bit", "nf4"))


def setup_from_recipe(recipe, gpus=None, config=None, gpu_memory=None) -> Setup:
    """Collect what the estimate needs from the recipe and the (optional) accelerate config."""
    t = recipe.training
    method = recipe.method.model_dump()
    shape_dtype = recipe.model.dtype
    bf16 = getattr(t, "bf16", None)
    fp16 = bool(getattr(t, "fp16", False))
    mixed = "fp16" if fp16 else ("bf16" if bf16 in (None, True, "auto") else None)  # GPUs: bf16 unless told
    ac = getattr(t, "activation_checkpointing", None)
    ac = getattr(t, "gradient_checkpointing", True) if ac is None else ac  # TRL's default is on
    s = Setup(
        method=method, freeze_train=list(recipe.freeze.train), freeze_freeze=list(recipe.freeze.freeze),
        weight_dtype=shape_dtype, mixed=mixed, optim=str(getattr(t, "optim", "adamw_torch")),
        micro_batch=int(getattr(t, "per_device_train_batch_size", 8)),
        seq_len=int(getattr(t, "max_length", None) or 1024), checkpointing=bool(ac),
    )
    # The objective's share: a preference row is two sequences; DPO/KTO keep a frozen reference copy
    # unless the policy is a PEFT model (the adapter off is the reference) or the reference log-probs
    # are computed once before training (objective.precompute_ref_log_probs).
    objective = objectives.get(recipe.objective.name)
    s.sequences = objective.sequences_per_row
    s.reference = objective.reference and not recipe.is_peft and \
        not getattr(recipe.objective, "precompute_ref_log_probs", False)
    if isinstance(getattr(t, "fsdp", None), str) and t.fsdp:
        _apply_fsdp_string(s, t.fsdp)
        s.backend = "fsdp"
    if config:
        _apply_accelerate_config(s, config)
    if gpus:
        s.gpus = gpus
    if gpu_memory:
        s.gpu_memory = parse_memory(gpu_memory)
    return s


def _apply_fsdp_string(s: Setup, spec: str) -> None:
    words = spec.split()
    for w in ("full_shard", "shard_grad_op", "no_shard", "hybrid_shard"):
        if w in words:
            s.sharding = "full_shard" if w == "hybrid_shard" else w
    s.offload = "offload" in words


def _apply_accelerate_config(s: Setup, path: str) -> None:
    """The launch plan accelerate builds from the config (runtime/launchplan.py): processes, precision, sharding."""
    apply_plan(s, launchplan.from_config(path))


def apply_plan(s: Setup, plan) -> None:
    s.gpus = plan.num_processes  # accelerate counts processes over all machines
    if plan.mixed_precision in ("bf16", "fp16"):
        s.mixed = plan.mixed_precision
    if plan.backend in ("fsdp", "deepspeed"):
        s.backend = plan.backend
        s.sharding = plan.sharding
    if plan.fsdp:
        s.offload = plan.fsdp_offload
        if plan.fsdp_activation_checkpointing:
            s.checkpointing = True
    elif plan.deepspeed:
        s.offload = plan.offload_param == "cpu"
        s.offload_optimizer = plan.offload_optimizer == "cpu"


def parse_memory(text: str) -> float:
    """'80GB', '24GiB', '16G', '40000MB' -> bytes. GB means GiB: cards are sold that way (80 GB = 81920 MiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([GgMmTt])?(?:i?[Bb])?\s*", str(text))
    if not m:
        raise UserError(f"cannot read --gpu-memory {text!r}", "write it like 80GB, 24GB or 16GiB")
    unit = {"g": GiB, "m": 2**20, "t": 2**40}[(m.group(2) or "g").lower()]
    size = float(m.group(1)) * unit
    if not 0 < size < float("inf"):
        raise UserError(f"--gpu-memory {text!r} is not a memory size a GPU has", "write it like 80GB, 24GB or 16GiB")
    return size


# ---------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    label: str
    trainable: int
    total_params: int
    weights: float
    gradients: float
    optimizer: float
    act_plain: float
    act_ckpt: float
    buffers: float
    checkpointing: bool
    cpu: float = 0.0  # bytes held in host RAM per process (CPU offload)
    notes: list[str] = field(default_factory=list)
    reference: float = 0.0  # a frozen copy of the model as the reference (preference objectives)

    @property
    def activations(self) -> float:
        return self.act_ckpt if self.checkpointing else self.act_plain

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers + self.reference


def _selected(rules, names: list[str], n_layers: int, where: str) -> set[str]:
    """Base parameter names the recipe's freeze rules select (the same matcher training uses)."""
    out: set[str] = set()
    for i, rule in enumerate(rules):
        rule = rule if isinstance(rule, ParamRule) else ParamRule(patterns=[rule]) if isinstance(rule, str) \
            else ParamRule.model_validate(rule)
        out |= rule_matches(rule, names, n_layers, f"{where}[{i}]")
    return out


def trainable_params(shape: ModelShape, s: Setup) -> tuple[dict[str, int], list[str]]:
    """New (adapter) parameters by name, and the base parameters that train."""
    m = s.section()
    extra, base_trained = methods.get(m["name"]).estimate_params(shape, m)
    # The recipe's freeze: rules act on the base model's parameter names.
    names = list(shape.params)
    if s.freeze_train:
        chosen = _selected(s.freeze_train, names, shape.num_layers, "freeze.train")
        base_trained = [n for n in names if n in chosen]
    if s.freeze_freeze:
        frozen = _selected(s.freeze_freeze, names, shape.num_layers, "freeze.freeze")
        base_trained = [n for n in base_trained if n not in frozen]
    return extra, base_trained


def optimizer_bytes_per_param(optim: str, param_bytes: int) -> float:
    """Bytes of optimizer state per trainable parameter."""
    o = optim.lower()
    if "8bit" in o:
        return 1.0 if "lion" in o else 2.0
    if o.startswith("sgd"):
        return 0.0  # the Trainer's SGD has no momentum unless optim_args set it
    if "lion" in o or "adagrad" in o or "rmsprop" in o:
        return float(param_bytes)
    if "adafactor" in o:
        return 0.05 * param_bytes  # factored second moment: rows + columns per matrix
    return 2.0 * param_bytes  # Adam family: exp_avg and exp_avg_sq, at the parameter's dtype


def backprop_layers(shape: ModelShape, extra: dict[str, int], base_trained: list[str]) -> int:
    """How many decoder layers backward runs through: from the lowest one holding a trainable
    parameter (or all, if the embeddings or an input-side adapter train) up to the top.
    Layers below it keep no activations (nothing below needs a gradient)."""
    names = [n.rsplit(".", 1)[0] for n in extra] + base_trained
    if any(shape.layer_of(n) is None and not n.startswith(("lm_head", "score", "model.norm")) for n in names):
        return shape.num_layers  # embeddings, prompt/prefix encoders: gradients flow to the bottom
    layers = [shape.layer_of(n) for n in names if shape.layer_of(n) is not None]
    return shape.num_layers - min(layers) if layers else 0


def activation_bytes(shape: ModelShape, s: Setup, lora_targets: list[str], r: int, dropout: float,
                     active: int) -> tuple[float, float]:
    """(without, with) activation checkpointing, per device, for one micro-batch.

    Per token and decoder layer, the tensors autograd saves (Llama-style block, SDPA attention):
      2 RMSNorms: input and normalized input at the residual dtype, the 16-bit copy under autocast
      q, k after RoPE, v, the attention output (twice: SDPA's and o_proj's contiguous input)
      MLP: gate, silu(gate), up, and their product (4 x intermediate)
      LoRA: lora_A output (r) per target; with dropout, the dropped input and a 1-byte mask.
    Plus, once: the logits (compute dtype), their fp32 upcast and the loss's log-softmax.
    With checkpointing each layer keeps only its input; one layer is recomputed at a time.
    Only the `active` top layers (those backward runs through) keep anything.
    """
    tokens = s.micro_batch * s.seq_len
    w = DTYPE_BYTES.get(s.weight_dtype if s.weight_dtype != "auto" else shape.dtype, 4)
    comp = 2 if s.mixed else w
    res = w if not s.quantized else comp  # the residual stream stays in the weights' dtype
    h, i = shape.hidden, shape.intermediate
    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (2 * h * res + (h * comp if comp != res else h * res))
    attn = (3 * qd + 2 * kvd) * comp
    mlp = 4 * i * comp
    per_layer = norms + attn + mlp
    lora = 0.0
    for t in lora_targets:
        fin, _ = shape.linears[t]
        lora += r * comp + (fin * comp + fin if dropout > 0 else 0)
    per_layer += lora / max(shape.num_layers, 1)
    logits = shape.vocab * (comp + (4 if comp != 4 else 0) + 4)
    plain = tokens * (active * per_layer + logits + h * res)
    ckpt = tokens * (active * h * res + (per_layer if active else 0) + logits + h * res)
    return plain, ckpt


def estimate(shape: ModelShape, s: Setup, label: str | None = None) -> Estimate:
    wdt = s.weight_dtype if s.weight_dtype != "auto" else shape.dtype
    w = DTYPE_BYTES.get(wdt, 4)  # unknown checkpoint dtypes (fp8, ...) load as fp32 upcasts
    notes = []
    extra, base_trained = trainable_params(shape, s)
    # Adapter dtype: PEFT upcasts adapters to fp32 (autocast_adapter_dtype); TRL casts them to
    # bf16 on a quantized base (QLoRA), except DoRA's magnitude vector.
    adapter_bytes = {n: (2 if s.quantized and "magnitude" not in n else 4) for n in extra}
    quant_targets = {n for n in shape.linears if not n.endswith("lm_head")} if s.quantized else set()
    # Bytes of a trained base parameter, of its gradient, and what the optimizer keeps per parameter.
    # FSDP with mixed precision: accelerate upcasts every trainable parameter to fp32 (its master
    # copy, whatever model.dtype says) and computes in bf16 on the gathered unit.
    # DeepSpeed ZeRO-3 with mixed precision: 16-bit weights and gradients, and an fp32 master copy
    # inside the optimizer state.
    tw = tg = w
    master = 0
    if s.backend == "fsdp" and s.mixed:
        tw = tg = 4
    elif s.backend == "deepspeed":
        # DeepSpeed's ZeRO optimizer steps on an fp32 copy of each rank's partition of the trained
        # parameters, also when they already are fp32 (measured on CPU: tests/test_distributed.py)
        if s.mixed:
            tw = tg = 2
        master = 4
    trained = set(base_trained)
    weights = 0.0
    for n, sh in shape.params.items():
        k = math.prod(sh)
        mod = n.rsplit(".", 1)[0]
        if mod in quant_targets and n.endswith("weight"):
            weights += k * NF4_BYTES
        elif n in trained:
            weights += k * tw
        else:
            weights += k * (comp_bytes(s) if s.quantized else w)
    weights += sum(k * adapter_bytes[n] for n, k in extra.items())
    n_base = sum(math.prod(shape.params[n]) for n in base_trained)
    n_train = n_base + sum(extra.values())
    grad_bytes = n_base * tg + sum(k * adapter_bytes[n] for n, k in extra.items())
    optim = n_base * (master + optimizer_bytes_per_param(s.optim, max(tw, master))) + \
        sum(k * (master + optimizer_bytes_per_param(s.optim, adapter_bytes[n])) for n, k in extra.items())
    if tw == 4 and w < 4 and n_base:
        notes.append("FSDP mixed precision keeps the trained parameters in fp32 (accelerate upcasts them), "
                     "whatever model.dtype says")

    m = s.section() if s.base_name == "lora" else {}
    targets = linear_targets(shape, m.get("target_modules")) if m else []
    plain, ckpt = activation_bytes(shape, s, targets, int(m.get("r", 0) or 0), float(m.get("dropout", 0) or 0),
                                   backprop_layers(shape, extra, base_trained))
    plain, ckpt = plain * s.sequences, ckpt * s.sequences  # chosen and rejected in one batch
    if methods.get(s.method["name"]).virtual_tokens:
        n_tok = int(s.section()["num_virtual_tokens"])
        scale = (s.seq_len + n_tok) / s.seq_len
        plain, ckpt = plain * scale, ckpt * scale
    # Sharding: the per-device share of persistent state, and the transient buffers.
    n = max(1, s.gpus)
    units = shape.unit_sizes()
    gather_bytes = comp_bytes(s) if s.mixed else w
    buffers = 0.0
    cpu = 0.0
    if s.sharding in ("full_shard", "shard_grad_op") and n >= 1:
        if s.sharding == "full_shard":
            # the root unit (embeddings, head) stays gathered through the step; one layer and its
            # prefetched successor are gathered at a time, and one layer's gradient is unsharded
            buffers = (units[-1] + 2 * max(units[:-1] or [0])) * gather_bytes \
                + (max(units[:-1] or [0]) * w if n_train else 0)
            dev_weights = weights / n
            gathered = 0.0
        elif s.backend == "deepspeed":
            # ZeRO-1/2: every rank keeps the whole parameters; gradients and optimizer state are partitioned
            buffers = (max(units[:-1] or [0]) * w if n_train else 0)
            gathered = 0.0
            dev_weights = weights
        else:
            buffers = (max(units[:-1] or [0]) * w if n_train else 0)
            gathered = shape.total * gather_bytes  # kept unsharded between forward and backward
            dev_weights = weights / n
        dev_grads, dev_optim = grad_bytes / n, optim / n
        if s.offload_optimizer:
            cpu += dev_optim
            notes.append(f"ZeRO-Offload: {dev_optim / GiB:.1f} GiB of optimizer state per process in host RAM "
                         "(the optimizer step runs on the CPU)")
            dev_optim = 0.0
        if s.offload:
            cpu += dev_weights + dev_grads + dev_optim
            dev_weights = dev_grads = dev_optim = 0.0
            notes.append(f"CPU offload: {cpu / GiB:.1f} GiB of host RAM per process")
        dev_weights += gathered
    else:
        dev_weights, dev_grads, dev_optim = weights, grad_bytes, optim
        if n > 1 and n_train:
            buffers = grad_bytes  # DDP gradient buckets: a second copy of every gradient
    if s.quantized and s.base_name != "lora":
        notes.append("4-bit base with a non-LoRA method: estimated as the same adapter on a NF4 base")
    # The reference model: a frozen copy loaded in the policy's dtype (TRL 1.16 passes model.dtype),
    # sharded like the policy under FSDP full_shard
    reference = shape.total * w / (n if s.sharding == "full_shard" else 1) if s.reference else 0.0
    if s.sequences > 1:
        notes.append(f"preference pairs: {s.sequences} sequences (chosen, rejected) per row in every batch")
    return Estimate(label or s.method["name"], n_train, shape.total + sum(extra.values()), dev_weights, dev_grads,
                    dev_optim, plain, ckpt, buffers, s.checkpointing, cpu, notes, reference)


def comp_bytes(s: Setup) -> int:
    return 2 if s.mixed or s.quantized else DTYPE_BYTES.get(s.weight_dtype, 4)


# ---------------------------------------------------------------------------------------------
# Verdict and options
# ---------------------------------------------------------------------------------------------
def fits(e: Estimate, s: Setup) -> bool:
    return s.gpu_memory is None or e.total <= USABLE * s.gpu_memory


def n_trainable_base(shape: ModelShape, s: Setup) -> int:
    return len(trainable_params(shape, s)[1])


def options(shape: ModelShape, s: Setup) -> list[tuple[str, Estimate]]:
    """Changes that make the run fit, cheapest first (what each costs is in the text)."""
    found: list[tuple[str, Estimate]] = []

    def add(text, setup):
        e = estimate(shape, setup)
        if fits(e, setup):
            found.append((text, e))

    if not s.checkpointing:
        add("turn on activation checkpointing (training.activation_checkpointing=true): ~30% slower steps",
            replace(s, checkpointing=True))
    for mb in (s.micro_batch // 2, s.micro_batch // 4, 1):
        if 1 <= mb < s.micro_batch:
            add(f"smaller micro-batch (training.per_device_train_batch_size={mb}, raise "
                f"gradient_accumulation_steps x{s.micro_batch // mb} to keep the batch): slower steps, same result",
                replace(s, micro_batch=mb, checkpointing=True) if not fits(estimate(shape, replace(s, micro_batch=mb)), s)
                else replace(s, micro_batch=mb))
            if found and "micro-batch" in found[-1][0]:
                break
    if s.sharding == "none":
        for g in (max(2, s.gpus), 2, 4, 8):
            if g >= max(2, s.gpus):
                cand = replace(s, gpus=g, sharding="full_shard", checkpointing=True)
                if fits(estimate(shape, cand), cand):
                    where = f"on your {g} GPUs instead of DDP" if g == s.gpus else f"over {g} GPUs"
                    add(f"FSDP full shard {where} (an FSDP accelerate config, --config) with activation "
                        "checkpointing: same result, some communication cost", cand)
                    break
    if s.mixed and s.weight_dtype == "float32" and n_trainable_base(shape, s) and s.backend != "fsdp":
        add("pure bf16 weights (model.dtype=bfloat16): half the state, but no fp32 master copy, so updates "
            "below bf16 resolution are lost", replace(s, weight_dtype="bfloat16", checkpointing=True))
    if s.base_name == "full" and not s.freeze_train:
        add("LoRA instead of full fine-tuning (method.name=lora): different method, less capacity",
            replace(s, method={"name": "lora", "r": 16}, weight_dtype="bfloat16", checkpointing=True))
    if not s.quantized and s.base_name in ("lora", "full"):
        add("QLoRA: 4-bit base (method.name=qlora): ~10-20% slower, small quality cost",
            replace(s, method={**({"r": 16} if s.base_name == "full" else s.method), "name": "qlora"},
                    checkpointing=True))
    if s.sharding != "none" and not s.offload:
        add("FSDP CPU offload (fsdp_offload_params: true): much slower steps, needs host RAM",
            replace(s, offload=True, checkpointing=True))
    seen, out = set(), []
    for text, e in found:
        if text not in seen:
            seen.add(text)
            out.append((text, e))
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def _g(x: float) -> str:
    return f"{x / GiB:.2f}"


def precision_text(s: Setup) -> str:
    if s.quantized:
        return "NF4 4-bit base, bf16 compute"
    if s.mixed and s.backend == "fsdp":
        return f"{s.mixed} mixed precision (trained parameters fp32 under FSDP, frozen ones {s.weight_dtype})"
    if s.mixed and s.backend == "deepspeed":
        return f"{s.mixed} weights and gradients, fp32 master copy in the optimizer (DeepSpeed)"
    if s.mixed and s.weight_dtype in ("float32",):
        return f"{s.mixed} mixed precision (fp32 weights)"
    if s.mixed:
        return f"pure {s.weight_dtype} weights, {s.mixed} autocast"
    return f"{s.weight_dtype}"


def sharding_text(s: Setup) -> str:
    if s.sharding == "none":
        return "DDP" if s.gpus > 1 else "single device"
    if s.backend == "deepspeed":
        t = {"full_shard": "DeepSpeed ZeRO-3", "shard_grad_op": "DeepSpeed ZeRO-2"}.get(s.sharding, "DeepSpeed")
        if s.offload_optimizer:
            t += " + optimizer offload"
    else:
        t = {"full_shard": "FSDP full shard", "shard_grad_op": "FSDP shard-grad-op", "no_shard": "FSDP no shard"}[s.sharding]
    return t + (" + CPU offload" if s.offload else "")


def render(shape: ModelShape, s: Setup, e: Estimate) -> str:
    rows = [
        ("weights", e.weights), ("gradients", e.gradients), ("optimizer states", e.optimizer),
        (f"activations, checkpointing off{' (in use)' if not s.checkpointing else ''}", e.act_plain),
        (f"activations, checkpointing on{' (in use)' if s.checkpointing else ''}", e.act_ckpt),
        ("temporary buffers", e.buffers),
    ] + ([("reference model (frozen copy)", e.reference)] if e.reference else [])
    unit, div = ("GiB", GiB) if e.total >= GiB / 4 else ("MiB", 2**20)  # tiny models read better in MiB
    lines = [
        f"model: {shape.total:,} parameters ({shape.num_layers} layers, hidden {shape.hidden}, vocab {shape.vocab})",
        f"method: {s.method['name']} — trainable {e.trainable:,} ({100 * e.trainable / max(e.total_params, 1):.3f}%)",
        f"precision: {precision_text(s)}; optimizer: {s.optim}; {sharding_text(s)} over {s.gpus} GPU(s)",
        f"micro-batch {s.micro_batch} x seq {s.seq_len}",
        "",
        f"{'per device':<44} {unit:>9}",
    ]
    lines += [f"{k:<44} {v / div:>9.2f}" for k, v in rows]
    lines.append(f"{'total':<44} {e.total / div:>9.2f}")
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def verdict(shape: ModelShape, s: Setup, e: Estimate) -> str:
    if s.gpu_memory is None:
        return "verdict: pass --gpu-memory (e.g. 80GB) for a fits / does-not-fit verdict"
    cap = USABLE * s.gpu_memory
    if e.total <= cap:
        return f"verdict: FITS — {_g(e.total)} of {_g(cap)} GiB usable ({s.gpu_memory / GiB:.0f} GiB card, 5% reserved)"
    out = [f"verdict: DOES NOT FIT — {_g(e.total)} GiB needed, {_g(cap)} GiB usable per device"]
    opts = options(shape, s)
    if opts:
        out.append("options, cheapest first:")
        out += [f"  {k}. {text}  -> {_g(oe.total)} GiB" for k, (text, oe) in enumerate(opts, 1)]
    else:
        out.append("no single change fits: combine FSDP over more GPUs, QLoRA and a shorter max_length")
    return "\n".join(out)


def compare_table(shape: ModelShape, s: Setup) -> str:
    head = f"{'method':<26} {'trainable':>14} {'weights':>8} {'grads':>7} {'optim':>7} {'act':>7} {'act+ck':>7} " \
           f"{'buffers':>8} {'total':>8}  fits"
    lines = [head, "-" * len(head)]
    for label, m in COMPARE:
        cs = replace(s, method=m, freeze_train=[], freeze_freeze=[])
        if cs.quantized:
            cs = replace(cs, weight_dtype="bfloat16")
        e = estimate(shape, cs, label)
        ok = "-" if s.gpu_memory is None else ("yes" if fits(e, cs) else "no")
        lines.append(f"{label:<26} {e.trainable:>14,} {_g(e.weights):>8} {_g(e.gradients):>7} {_g(e.optimizer):>7} "
                     f"{_g(e.act_plain):>7} {_g(e.act_ckpt):>7} {_g(e.buffers):>8} {_g(e.total):>8}  {ok}")
    lines.append(f"(GiB per device; total uses checkpointing {'on' if s.checkpointing else 'off'} as in the recipe)")
    return "\n".join(lines)


def estimate_for_config(cfg, method: str = "full", activation_checkpointing: bool = False, batch: int = 1,
                        seq: int = 1024, gpus: int = 1, sharding: str = "full_shard") -> dict:
    """Estimate for a model config object (no recipe): what bench/gpu_bench.py compares with
    torch.cuda.max_memory_allocated. bf16 weights (pure bf16 base, as that benchmark loads it for
    LoRA) or fp32 weights with bf16 autocast (full), AdamW, FSDP over `gpus`."""
    shape = model_shape(cfg)
    s = Setup(method={"name": method, **({"r": 16, "dropout": 0.0} if method == "lora" else {})},
              weight_dtype="bfloat16" if method == "lora" else "float32", mixed="bf16",
              micro_batch=batch, seq_len=seq, checkpointing=activation_checkpointing, gpus=gpus,
              sharding=sharding)
    e = estimate(shape, s)
    return {"total_bytes": e.total, "weights": e.weights, "gradients": e.gradients, "optimizer": e.optimizer,
            "activations": e.activations, "buffers": e.buffers}


def estimate_recipe(recipe, gpus=None, config=None, gpu_memory=None):
    """(shape, setup, estimate) for a validated recipe."""
    # A GGUF (model.gguf_file, builtin:smollm2-135m-instruct): its config from the file's metadata
    shape = recipe_shape(recipe.model)
    s = setup_from_recipe(recipe, gpus, config, gpu_memory)

    own = getattr(objectives.get(recipe.objective.name), "memory", None)
    return shape, s, own(shape, s, recipe, estimate) if own else estimate(shape, s)


def main(recipe, args) -> int:
    """`--estimate-memory`: print the table and the verdict. Exit 0 when it fits (or no memory given), 1 if not."""
    shape, s, e = estimate_recipe(recipe, args.gpus, args.config, args.gpu_memory)
    print(render(shape, s, e))
    if args.compare:
        print()
        print(compare_table(shape, s))
    print()
    print(verdict(shape, s, e))
    return 0 if fits(e, s) else 1
