"""Several adapters on one loaded base: switch by name for eval and generation, no base reload.

    llama-recipes adapters NAME=OUTPUT_DIR [NAME=OUTPUT_DIR ...] [--prompt TEXT [--input TEXT] ...]
    python -m llama_recipes.adapters NAME=OUTPUT_DIR ...          (the same)

Every OUTPUT_DIR is a PEFT run's directory on the same base model. Prints the memory arithmetic
(one base + N adapters versus N full models) and, with --prompt, each adapter's greedy answer.
For runs trained on alpaca data, `--input` gives the i-th prompt its `input` field (the instruction
is the --prompt), so a task trained with inputs is asked the way it was trained.
"""
from dataclasses import dataclass
from pathlib import Path

from llama_recipes import artifacts, formats, measure, methods, modeling
from llama_recipes.errors import UserError, read_json
from llama_recipes.log import get_logger
from llama_recipes.schema.model import ModelConfig

log = get_logger(__name__)


@dataclass
class MemoryReport:
    base_bytes: int
    adapter_bytes: dict[str, int]

    @property
    def shared(self) -> int:
        return self.base_bytes + sum(self.adapter_bytes.values())

    @property
    def separate(self) -> int:
        return len(self.adapter_bytes) * self.base_bytes

    def render(self) -> str:
        mb = 2**20
        n = len(self.adapter_bytes)
        lines = [f"base model: {self.base_bytes / mb:,.2f} MiB"]
        lines += [f"adapter {k}: {v / mb:,.3f} MiB" for k, v in self.adapter_bytes.items()]
        ratio = self.separate / max(self.shared, 1)
        # one adapter: base + adapter is MORE than one model alone (the sharing pays from two adapters on)
        than = f"{ratio:.2f}x less" if ratio >= 1 else f"{1 / ratio:.2f}x more: sharing a base pays from 2 adapters on"
        lines.append(f"one base + {n} adapters: {self.shared / mb:,.2f} MiB   vs   {n} full models: "
                     f"{self.separate / mb:,.2f} MiB   ({than})")
        return "\n".join(lines)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class MultiAdapter:
    """One base model in memory and named adapters on top of it (PEFT's multi-adapter PeftModel)."""

    def __init__(self, runs: dict[str, str | Path], trust_remote_code: bool = False):
        if not runs:
            raise UserError("no adapters given", "pass NAME=OUTPUT_DIR for at least one PEFT run")
        from peft import PeftModel

        self.runs = {k: Path(v) for k, v in runs.items()}
        bases, types = {}, {}
        for name, path in self.runs.items():
            cfg, recipe = artifacts.read_adapter_run(path)
            types[name] = cfg.get("peft_type")
            # the base as the run's recipe names it; trust_remote_code only as this caller grants it
            bases[name] = (artifacts.run_model_config(recipe, path, trust_remote_code).model_dump() if recipe else
                           {"name_or_path": cfg["base_model_name_or_path"], "trust_remote_code": trust_remote_code})
            method = methods.REGISTRY.get((recipe or {}).get("method", {}).get("name"))
            if method is not None and method.quantized:
                raise UserError(f"adapter {name} is a QLoRA adapter", "merge it (llama_recipes.export) or load it alone")
        first = next(iter(bases))
        if len(set(types.values())) > 1:
            raise UserError(f"adapters of different PEFT types on one base: {types}",
                            "load adapters of one type together (e.g. all LoRA/DoRA)")
        for name, b in bases.items():
            if (b["name_or_path"], b.get("gguf_file")) != (bases[first]["name_or_path"], bases[first].get("gguf_file")):
                raise UserError(f"adapters {first} and {name} were trained on different bases "
                                f"({bases[first]['name_or_path']} vs {b['name_or_path']})",
                                "load only adapters trained on the same base model")
        self.tokenizer = modeling.load_tokenizer(ModelConfig(**bases[first]))
        base = modeling.load_model(ModelConfig(**bases[first]))
        self.base_bytes = _tensor_bytes(base.parameters())
        names = list(self.runs)
        self.model = PeftModel.from_pretrained(base, str(self.runs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(self.runs[name]), adapter_name=name)
        self.model.eval()
        self.active = names[0]

    def use(self, name: str):
        """Make `name` the active adapter; returns the model (same object, same base weights)."""
        if name not in self.runs:
            raise UserError(f"no adapter named {name!r}", f"use one of: {', '.join(self.runs)}")
        self.model.set_adapter(name)
        self.active = name
        return self.model

    def memory(self) -> MemoryReport:
        from safetensors import safe_open

        sizes = {}
        for name, path in self.runs.items():
            with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
                sizes[name] = _tensor_bytes(f.get_tensor(k) for k in f.keys())
        return MemoryReport(self.base_bytes, sizes)

    def generate(self, name: str, prompts: list[str], max_new_tokens: int = 32, raw: bool = False,
                 inputs: list[str] | None = None) -> list[str]:
        """Greedy answers of adapter `name`. Each prompt is rendered as that run's training rendered its
        prompts (prompt template, or chat template for chat data), unless `raw`. `inputs[i]` is the alpaca
        `input` of prompts[i] (missing ones are empty)."""
        inputs = list(inputs or [])
        if len(inputs) > len(prompts):
            raise UserError(f"{len(inputs)} --input for {len(prompts)} --prompt",
                            "the i-th --input goes with the i-th --prompt: give at most one per prompt")
        if raw:
            if inputs:
                raise UserError("--input with --raw", "--raw passes --prompt as given: put the input into it")
            return measure.generate(self.use(name), self.tokenizer, prompts, max_new_tokens)
        texts, special, fmt = prompt_renderer(self.runs[name], self.tokenizer)
        if any(inputs) and not getattr(formats.REGISTRY.get(fmt), "takes_input", False):
            raise UserError(f"--input given, but adapter {name} was trained on {fmt} data, which has no input field",
                            "drop --input, or put the text into --prompt")
        inputs += [""] * (len(prompts) - len(inputs))
        return measure.generate(self.use(name), self.tokenizer, [texts(p, i) for p, i in zip(prompts, inputs)],
                                max_new_tokens, add_special_tokens=special)


def prompt_renderer(path: Path, tokenizer):
    """(render(text, input), add_special_tokens, format): what a run's training made of a user's text, from
    its recipe.yaml and metrics.json (the data format it detected): that format's `prompt` (formats.py) with
    the run's prompt_template (alpaca: the Alpaca template by default; summarization: the document; chat:
    one user turn through the chat template the run saved with its tokenizer); text, or a run without that
    record: the text as given. `input` is used by alpaca only."""
    _, saved = artifacts.read_run(path)
    data_cfg = (saved or {}).get("data") or {}
    metrics = path / "metrics.json"
    fmt = (read_json(metrics).get("data_format") if metrics.is_file() else None) or data_cfg.get("format", "auto")
    fmt = fmt.split("+")[0]  # a mix renders every source the same way
    spec = formats.REGISTRY.get(fmt)
    if spec is not None and spec.chat and (path / "tokenizer_config.json").is_file():
        tokenizer = modeling.load_tokenizer(ModelConfig(name_or_path=str(path)))  # the template training installed
    rendered = spec.prompt(data_cfg.get("prompt_template"), tokenizer) if spec is not None else None
    if rendered:
        return (*rendered, fmt)
    if fmt in ("auto", None):
        log.warning("%s records no data format (no metrics.json): prompts are passed as given", path)
    return (lambda t, i="": t), True, fmt
