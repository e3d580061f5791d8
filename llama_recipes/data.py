"""Turn the recipe's `data:` section into train/eval datasets of prompt/completion or text rows.

Rows are rendered to the shapes TRL's SFTTrainer understands (prompt/completion for
instruction data, so only the completion is supervised; text for plain language modelling).
TRL then tokenizes, appends EOS and builds the loss masks.
"""
from pathlib import Path

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger
from llama_recipes.paths import resolve
from llama_recipes.schema.data import DataConfig

log = get_logger(__name__)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _local_files(path: Path, split: str) -> dict[str, list[str]] | None:
    """Files for one split of a local directory (SPLIT.jsonl, SPLIT.csv, ...)."""
    files = sorted(str(p) for p in path.iterdir() if p.stem == split and p.suffix in _EXTENSIONS)
    return {split: files} if files else None


def load_split(cfg: DataConfig, split: str):
    """Load one split from a builtin, a local file/directory, or the hub."""
    import datasets

    ref = resolve(cfg.path, "data")
    path = Path(ref)
    if path.is_file():
        if path.suffix not in _EXTENSIONS:
            raise UserError(f"unsupported data file type {path.suffix!r}: {path}", "use .json, .jsonl, .csv or .parquet")
        if split != cfg.split:
            return None
        return datasets.load_dataset(_EXTENSIONS[path.suffix], data_files=str(path), split="train")
    if path.is_dir():
        files = _local_files(path, split)
        if files is None:
            return None
        builder = _EXTENSIONS[Path(files[split][0]).suffix]
        return datasets.load_dataset(builder, data_files=files, split=split)
    if ref.startswith((".", "/", "~")) or path.suffix in _EXTENSIONS:
        raise UserError(f"data file or directory not found: {ref}", "check data.path (relative paths start at the "
                        "current directory), or use builtin:demo to try the bundled data")
    try:
        return datasets.load_dataset(ref, cfg.name, split=split, revision=cfg.revision)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"cannot load dataset {ref!r} (split {split}): {str(e).splitlines()[0]}",
            "offline (HF_HUB_OFFLINE=1) only cached hub datasets load; point data.path at a local "
            ".jsonl/.csv/.parquet file or directory instead",
        ) from None


def detect_format(columns: list[str]) -> str:
    cols = set(columns)
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "messages" in cols:
        return "chat"
    if "text" in cols:
        return "text"
    raise UserError(f"cannot detect the data format from columns {sorted(cols)}",
                    "set data.format (alpaca, prompt_completion, chat, text) and data.columns if names differ")


def render_alpaca(row: dict, template: str | None = None) -> dict:
    has_input = bool((row.get("input") or "").strip())
    prompt = (template or (ALPACA_PROMPT if has_input else ALPACA_PROMPT_NO_INPUT)).format(**row)
    return {"prompt": prompt, "completion": row["output"]}


def render(ds, cfg: DataConfig):
    """Rename mapped columns and render rows into the shape SFTTrainer expects."""
    ds = ds.rename_columns({v: k for k, v in cfg.columns.items() if v in ds.column_names and v != k})
    fmt = cfg.format if cfg.format != "auto" else detect_format(ds.column_names)
    if fmt == "alpaca":
        ds = ds.map(lambda r: render_alpaca(r, cfg.prompt_template), remove_columns=ds.column_names)
    elif fmt in ("prompt_completion", "text", "chat"):
        keep = {"prompt_completion": ["prompt", "completion"], "text": ["text"], "chat": ["messages"]}[fmt]
        ds = ds.select_columns(keep)
    else:
        raise UserError(f"data.format {fmt!r} is not supported yet", "use alpaca, prompt_completion, chat or text")
    return ds, fmt


def build_datasets(cfg: DataConfig):
    """(train, eval or None, format name)."""
    train = load_split(cfg, cfg.split)
    if train is None:
        raise UserError(f"no split {cfg.split!r} in {cfg.path}", "set data.split to an existing split")
    eval_ds = None
    if isinstance(cfg.eval_split, float):
        if not 0 < cfg.eval_split < 1:
            raise UserError(f"data.eval_split fraction must be between 0 and 1, got {cfg.eval_split}")
        parts = train.train_test_split(test_size=cfg.eval_split, seed=cfg.seed)
        train, eval_ds = parts["train"], parts["test"]
    elif cfg.eval_split:
        eval_ds = load_split(cfg, cfg.eval_split)
        if eval_ds is None:
            raise UserError(f"no eval split {cfg.eval_split!r} in {cfg.path}",
                            "set data.eval_split to a split name or a fraction such as 0.05")
    if cfg.max_samples:
        train = train.select(range(min(cfg.max_samples, len(train))))
    if eval_ds is not None and cfg.max_eval_samples:
        eval_ds = eval_ds.select(range(min(cfg.max_eval_samples, len(eval_ds))))
    train, fmt = render(train, cfg)
    if eval_ds is not None:
        eval_ds, _ = render(eval_ds, cfg)
    log.info("data: %s format, %d train rows%s", fmt, len(train),
             f", {len(eval_ds)} eval rows" if eval_ds is not None else "")
    return train, eval_ds, fmt
