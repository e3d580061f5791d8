"""Turn the recipe's `data:` section into the datasets TRL's SFTTrainer consumes.

    load (hub / local files / builtin, one or a weighted mix) -> check every row (bad rows: error
    naming file, row and column, or skip and count) -> render -> split eval -> count lengths

Rendered shapes: prompt/completion (alpaca, prompt_completion, summarization: TRL supervises the
completion only), `messages` (chat: tokenized here by chat.py into input_ids + assistant_masks
derived from the template, which TRL turns into labels), `text` (plain LM), text + ClassLabel
`label` (classification, for head methods). TRL appends EOS to text and completions; for chat
the template supplies it. What differs by format (its columns, row checks, renderer, family) is
the format's object in formats.py; this module asks it and never branches on a format's name.
Every `map`/`filter` here goes through `datasets`, so a second run loads it from the cache.
"""
import bisect
import json
from pathlib import Path

from llama_recipes import chat, formats
from llama_recipes.errors import UserError
from llama_recipes.formats import ALPACA_PROMPT, SUMMARY_PROMPT, render_alpaca  # noqa: F401  (re-exported)
from llama_recipes.log import get_logger
from llama_recipes.paths import resolve
from llama_recipes.schema import read_text
from llama_recipes.schema.data import DataConfig, SourceConfig

log = get_logger(__name__)

_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_PROBLEM = "__problem"
NOT_TEXT = "\x00not text: "  # a value of a text column that is not text (_exact_json_columns)


class Built(tuple):
    """(train, eval or None, format name), plus `.stats` (row counts, skipped rows) for the metrics."""

    def __new__(cls, train, eval_ds, fmt, stats):
        obj = super().__new__(cls, (train, eval_ds, fmt))
        obj.stats = stats
        return obj


# -- loading --------------------------------------------------------------------------------------


class Rows:
    """A loaded split and where each row came from (for error messages: file and row index)."""

    def __init__(self, ds, origins: list[tuple[int, str]]):
        self.ds, self.origins = ds, origins

    def where(self, i: int) -> str:
        k = bisect.bisect_right([start for start, _ in self.origins], i) - 1
        start, name = self.origins[k]
        return f"{name} row {i - start}"


def _files_for(path: Path, split: str) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.stem == split and p.suffix in _EXTENSIONS)


def _load_files(files: list[Path]) -> Rows:
    import logging

    import datasets

    # The JSON builder logs a parse failure with its traceback before raising; the UserError
    # below says the same thing with the file name and the fix.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    logging.getLogger("datasets.packaged_modules.parquet.parquet").setLevel(logging.CRITICAL)
    parts, origins, start = [], [], 0
    for f in files:
        _check_file(f)
        try:
            ds = datasets.load_dataset(_EXTENSIONS[f.suffix], data_files=str(f), split="train")
        except Exception as e:  # noqa: BLE001 - arrow/json errors: one column with mixed types, bad JSON
            cause = e.__cause__ or e
            text = str(cause).splitlines()[0][:300] if str(cause) else ""
            if "corresponds to no data" in text or type(cause).__name__ == "EmptyDataError":
                note = " (a CSV needs a header line and at least one row)" if f.suffix == ".csv" else ""
                raise UserError(f"{f} has no rows{note}",
                                "add rows, or point data.path at another file") from None
            raise UserError(f"cannot read {f}: {type(cause).__name__}: {text}", _read_fix(f, text)) from None
        if len(ds) == 0:
            raise UserError(f"{f} has no rows", "add rows, or point data.path at another file")
        json_cols = [c for c, feat in ds.features.items() if isinstance(feat, datasets.Json)]
        if json_cols and f.suffix in (".json", ".jsonl"):
            ds = _exact_json_columns(f, ds, json_cols)
        parts.append(ds)
        origins.append((start, str(f)))
        start += len(ds)
    try:
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise UserError(f"files of one split have different columns: {[str(f) for f in files]}: {e}") from None
    return Rows(ds, origins)


def _exact_json_columns(f: Path, ds, cols: list[str]):
    """A text column with one odd value (a number, a list) is typed Json by datasets, which then decodes its
    *strings* as JSON, and again at every map: the text '"Hello"' reads as Hello, 'null' as None (issue 29).
    Such a column (mostly strings in the file) is read again as plain text: its strings exactly as written,
    each other value as a NOT_TEXT note (a NUL byte first: no text file that passed _check_file holds one)
    that the row checks refuse or skip like any bad row. A column of structures (conversations whose
    messages differ in shape) keeps datasets' reading."""
    import datasets

    text = f.read_text(encoding="utf-8-sig")
    try:
        records = ([json.loads(line) for line in text.splitlines() if line.strip()] if f.suffix == ".jsonl"
                   else json.loads(text))
    except ValueError:
        return ds  # datasets read it anyway (its parser is laxer): keep its reading
    if not isinstance(records, list) or len(records) != len(ds) or not all(isinstance(r, dict) for r in records):
        return ds  # another layout (rows under a key, ...): keep datasets' reading
    plain = {}
    for c in cols:
        values = [r.get(c) for r in records]
        odd = [(i, v) for i, v in enumerate(values) if v is not None and not isinstance(v, str)]
        if len(odd) * 2 >= sum(v is not None for v in values):
            continue  # mostly structures: not a text column
        plain[c] = [v if v is None or isinstance(v, str) else
                    f"{NOT_TEXT}a {type(v).__name__} ({json.dumps(v)[:40]}) where the file's other rows hold text: "
                    "a column must not mix plain text and messages, numbers or lists" for v in values]
    if not plain:
        return ds
    text_cols = datasets.Dataset.from_dict(plain, features=datasets.Features({c: datasets.Value("string") for c in plain}))
    return datasets.concatenate_datasets([ds.remove_columns(list(plain)), text_cols], axis=1).select_columns(ds.column_names)


def _check_file(f: Path) -> None:
    """Refuse an empty file, or a text file that is not UTF-8 (arrow would misread it or replace bytes)."""
    if f.stat().st_size == 0:
        raise UserError(f"data file {f} is empty", "add rows, or point data.path at another file")
    if f.suffix == ".parquet":
        return
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if b"\x00" in chunk:
                raise UserError(f"data file {f} is not UTF-8 text (it holds NUL bytes: UTF-16 or a binary file?)",
                                "save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"data file {f} is not UTF-8 text (invalid byte at offset {offset + e.start})",
                                "save it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"data file {f} is not UTF-8 text (it ends inside a character: truncated?)",
                        "save it as UTF-8, complete") from None


def _read_fix(f: Path, text: str) -> str:
    if f.suffix == ".parquet":
        return "the file is damaged or not parquet: write it again (e.g. pandas DataFrame.to_parquet)"
    if "JSON" in text or "decoding" in text:
        return "fix the JSON at that row (a .jsonl file holds one JSON object per line)"
    return "every row needs the same columns with the same types (strings stay strings)"


def load_split(src: SourceConfig, split: str) -> Rows | None:
    """One split from a builtin, a local file/directory, or the hub; None if the split does not exist."""
    import datasets

    ref = resolve(src.path, "data")
    path = Path(ref)
    if path.is_file():
        if path.suffix not in _EXTENSIONS:
            raise UserError(f"unsupported data file type {path.suffix!r}: {path}", "use .json, .jsonl, .csv or .parquet")
        return _load_files([path]) if split == src.split else None
    if path.is_dir():
        files = _files_for(path, split)
        return _load_files(files) if files else None
    if ref.startswith((".", "/", "~")) or Path(ref).suffix in _EXTENSIONS:
        raise UserError(f"data file or directory not found: {ref}", "check data.path")
    try:
        ds = datasets.load_dataset(ref, src.name, split=split, revision=src.revision)
    except ValueError as e:
        if "split" in str(e).lower():
            return None
        raise
    except Exception as e:  # noqa: BLE001 - the hub raises many types; all mean "cannot get it"
        import os

        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise UserError(
            f"cannot load dataset {ref!r} (split {split}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            ("offline (HF_HUB_OFFLINE=1): only datasets already in the HF cache load. " if offline else "")
            + "Download it once with the network, or point data.path at a local .jsonl/.csv/.parquet file or a "
            "directory with train.jsonl (and eval.jsonl)",
        ) from None
    return Rows(ds, [(0, f"{ref}[{split}]")])


# -- columns and row checks (what each format requires: formats.py) --------------------------------


def _canonical(ds, src: SourceConfig, fmt_hint: str):
    mapping = {theirs: ours for ours, theirs in src.columns.items() if theirs != ours}
    missing = [theirs for theirs in mapping if theirs not in ds.column_names]
    if missing:
        raise UserError(f"data.columns maps columns that are not in {src.path}: {missing} "
                        f"(columns: {ds.column_names})", "fix data.columns")
    clash = [ours for theirs, ours in mapping.items() if ours in ds.column_names and ours not in mapping]
    if clash:
        raise UserError(f"data.columns maps a column onto `{clash[0]}`, and {src.path} already has a column "
                        f"`{clash[0]}` (columns: {ds.column_names})",
                        f"drop the data.columns entry for {clash[0]}, or rename the data's own `{clash[0]}` column")
    ds = ds.rename_columns(mapping) if mapping else ds
    for f in formats.REGISTRY.values() if fmt_hint == "auto" else [formats.get(fmt_hint)]:
        aliases = f.renames(ds.column_names)  # summarization reads a `dialogue` column as its document
        ds = ds.rename_columns(aliases) if aliases else ds
    return ds


def _row_problem(row: dict, fmt: str, label_ids: dict | None) -> str:
    """'' for a good row, else 'column `X`: what is wrong'."""
    form = formats.get(fmt)
    for col in (*form.required, *form.optional):  # a value _exact_json_columns found not to be text
        if isinstance(row.get(col), str) and row[col].startswith(NOT_TEXT):
            return f"column `{col}`: {row[col][len(NOT_TEXT):]}"
    return form.problem(row, label_ids)


def require_columns(rows: Rows, fmt: str) -> None:
    """The columns format `fmt` requires are there (a clear error naming the first missing one)."""
    absent = [c for c in formats.get(fmt).required if c not in rows.ds.column_names]
    if absent:
        raise UserError(f"{rows.origins[0][1]}: column {absent[0]!r} missing for format {fmt} "
                        f"(columns: {rows.ds.column_names})",
                        "map your column with data.columns (e.g. {%s: your_column}) or set data.format" % absent[0])


def check_rows(rows: Rows, fmt: str, policy: str, label_ids: dict | None = None):
    """Drop or refuse bad rows. Returns (dataset without bad rows, number skipped)."""
    ds = rows.ds
    require_columns(rows, fmt)
    checked = ds.map(
        lambda batch: {_PROBLEM: [_row_problem({k: batch[k][i] for k in batch}, fmt, label_ids)
                                  for i in range(len(batch[_first(batch)]))]},
        batched=True, desc=f"checking {fmt} rows",
    )
    bad = [i for i, p in enumerate(checked[_PROBLEM]) if p]
    if bad and policy == "error":
        i = bad[0]
        raise UserError(f"bad row: {rows.where(i)}: {checked[i][_PROBLEM]}"
                        + (f" ({len(bad) - 1} more bad rows)" if len(bad) > 1 else ""),
                        "fix the data, or set data.bad_rows: skip to drop such rows (they are counted)")
    if bad:
        first = checked[bad[0]][_PROBLEM]
        log.warning("data: skipped %d bad rows of %s (first: %s: %s)", len(bad), rows.origins[0][1],
                    rows.where(bad[0]), first)
        checked = checked.filter(lambda p: not p, input_columns=[_PROBLEM], desc="dropping bad rows")
        if len(checked) == 0:
            raise UserError(f"data.bad_rows: skip dropped every row of {rows.origins[0][1]} (first: {rows.where(bad[0])}: "
                            f"{first})", "fix the data (or data.format / data.columns if every row is read wrongly)")
    return checked.remove_columns(_PROBLEM), len(bad)


def _first(batch: dict) -> str:
    return next(iter(batch))


def label_set(ds, cfg: DataConfig) -> list[str]:
    """id -> name: data.label_names, the dataset's ClassLabel names, sorted strings, or 0..max for ints."""
    import datasets

    if cfg.label_names:
        return list(cfg.label_names)
    feature = ds.features.get("label")
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = {v for v in ds["label"] if v is not None and not isinstance(v, bool)}
    if values and all(isinstance(v, int) for v in values):
        if min(values) < 0:
            raise UserError(f"classification labels must be >= 0, got {min(values)}", "use ids 0..N-1 or names")
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values if isinstance(v, str))


def label_ids_for(names: list[str], ds) -> dict:
    """Accepted raw label values -> id: names, and ids 0..N-1 where the column holds integers."""
    ids: dict = {n: i for i, n in enumerate(names)}
    if "label" in ds.column_names and str(ds.features["label"].dtype).startswith("int"):
        ids.update({i: i for i in range(len(names))})
    return ids


# -- rendering ------------------------------------------------------------------------------------


def render(ds, src: SourceConfig, fmt: str, label_names: list[str] | None = None, label_ids: dict | None = None):
    """Render checked rows into the columns SFTTrainer (or a head method) consumes."""
    if fmt not in formats.REGISTRY:
        raise UserError(f"data.format {fmt!r} is not supported")
    return formats.get(fmt).render(ds, src.prompt_template, label_names, label_ids)


# -- the whole section -----------------------------------------------------------------------------


def _mix(parts: list, weights: list[float], total: int | None, seed: int):
    """Concatenate sources so that source i holds weight_i / sum(weights) of the rows (cycling if short)."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    size = total or sum(len(p) for p in parts)
    shares = [w / sum(weights) for w in weights]
    picked = []
    for p, share in zip(parts, shares):
        n = round(share * size)
        order = p.shuffle(seed=seed)
        idx = [i % len(p) for i in range(n)]
        if n > len(p):
            log.info("data: mix repeats a source %.1fx to reach its weight", n / len(p))
        picked.append(order.select(idx))
    return datasets.concatenate_datasets(picked).shuffle(seed=seed)


def build_datasets(cfg: DataConfig, accepted: tuple[str, ...] | None = None) -> Built:
    """(train, eval or None, format name) with `.stats`; every row checked, rendered, counted.

    `accepted`: the formats the recipe's objective trains on; a detected format outside them is refused
    before any row is checked (an explicit data.format is already checked by the schema).
    """
    import datasets

    trains, evals, fmts, weights = [], [], [], []
    stats = {"skipped_rows": 0, "sources": []}
    names = None
    for src in cfg.sources():
        train = load_split(src, src.split)
        if train is None:
            raise UserError(f"no split {src.split!r} in {src.path}", "set data.split to an existing split")
        held = None
        if isinstance(src.eval_split, str):
            held = load_split(src, src.eval_split)
            if held is None:
                raise UserError(f"no eval split {src.eval_split!r} in {src.path}",
                                "set data.eval_split to a split name or a fraction such as 0.05")
        train.ds = _canonical(train.ds, src, src.format)
        fmt = src.format if src.format != "auto" else formats.detect(train.ds.column_names)
        if accepted and fmt not in accepted:
            raise UserError(f"{src.path} holds {fmt} data (detected from its columns {train.ds.column_names}), and "
                            f"the recipe's objective trains on {' or '.join(accepted)} data",
                            "point data.path at data of that format (data.columns maps your column names), or "
                            "change objective.name (docs/preference.md lists the formats of each objective)")
        label_ids = None
        require_columns(train, fmt)
        if formats.get(fmt).labels:
            names = names or label_set(train.ds, cfg)
            label_ids = label_ids_for(names, train.ds)
        train_ds, skipped = check_rows(train, fmt, cfg.bad_rows, label_ids)
        stats["skipped_rows"] += skipped
        eval_ds = eval_ids = None
        if held is not None:
            held.ds = _canonical(held.ds, src, fmt)
            eval_ids = label_ids_for(names, held.ds) if formats.get(fmt).labels else None
            eval_ds, skipped = check_rows(held, fmt, cfg.bad_rows, eval_ids)
            stats["skipped_rows"] += skipped
        elif isinstance(src.eval_split, float):
            parts = train_ds.train_test_split(test_size=src.eval_split, seed=cfg.seed)
            train_ds, eval_ds, eval_ids = parts["train"], parts["test"], label_ids
        trains.append(render(train_ds, src, fmt, names, label_ids))
        if eval_ds is not None:
            evals.append(render(eval_ds, src, fmt, names, eval_ids))
        fmts.append(fmt)
        weights.append(src.weight)
        stats["sources"].append({"path": src.path, "format": fmt, "train_rows": len(train_ds),
                                 "eval_rows": len(eval_ds) if eval_ds is not None else 0})

    families = {formats.get(f).family for f in fmts}
    if len(families) > 1:
        raise UserError(f"data.mix combines formats that render differently: {fmts}",
                        "mix only formats of one family (alpaca, prompt_completion and summarization mix)")
    fmt = fmts[0] if len(set(fmts)) == 1 else "+".join(dict.fromkeys(fmts))
    train = _mix(trains, weights, cfg.max_samples, cfg.seed)
    if cfg.max_samples and len(train) > cfg.max_samples:
        train = train.select(range(cfg.max_samples))
    eval_ds = None
    if evals:
        eval_ds = evals[0] if len(evals) == 1 else datasets.concatenate_datasets(evals)
        if cfg.max_eval_samples:
            eval_ds = eval_ds.select(range(min(cfg.max_eval_samples, len(eval_ds))))
    stats.update(format=fmt, train_rows=len(train), eval_rows=len(eval_ds) if eval_ds is not None else 0)
    if formats.get(fmts[0]).labels:  # (one family: every source is classification data)
        stats["label_names"] = names
    log.info("data: %s format, %d train rows%s%s", fmt, len(train),
             f", {len(eval_ds)} eval rows" if eval_ds is not None else "",
             f", {stats['skipped_rows']} bad rows skipped" if stats["skipped_rows"] else "")
    return Built(train, eval_ds, fmt, stats)


# -- what the trainer needs --------------------------------------------------------------------------


def sft_overrides(recipe, train_ds) -> dict:
    """The SFTConfig keys that follow from the data (the schema refuses them in `training:`)."""
    family = formats.shape(train_ds.column_names)
    if family.labels:
        raise UserError("classification data (text + label) cannot train a causal LM with SFTTrainer",
                        "use a classification-head method, or format: text for plain language modelling")
    # Chat rows reach TRL tokenized, with assistant_masks (data.prepare): TRL's own assistant_only_loss would
    # need {% generation %} markers in the template.
    out = {"dataset_text_field": "text",
           "completion_only_loss": family.completion_only and not recipe.data.train_on_prompt,
           "assistant_only_loss": False}
    if getattr(recipe.training, "packing", False) and "eval_packing" not in recipe.training.model_fields_set:
        out["eval_packing"] = False  # eval loss per example, comparable across runs with and without packing
    return out


def apply_chat_template_choice(recipe, tokenizer, sample=None, assistant_spans: bool = True):
    """Install data.chat_template on the tokenizer (so the saved artifact renders chats the same way) and check
    that assistant turns can be found in it (chat.py)."""
    template = recipe.data.chat_template
    is_file = bool(template) and "{" not in template and "\n" not in template  # as the schema reads it
    if is_file:  # read here: UTF-8 (or UTF-16 with its BOM) and not empty, else a clear error naming the file
        tokenizer.chat_template = _template_file(Path(template))
    chat.install_template(tokenizer, None if is_file else template)
    where = template if is_file else "data.chat_template" if template else \
        f"chat template of {recipe.model.tokenizer or recipe.model.name_or_path}"
    _check_jinja(tokenizer.chat_template, where)
    if not assistant_spans:  # preference data: TRL finds the completion where prompt and answer diverge
        return
    try:
        chat.check_template(tokenizer, only_assistant=not recipe.data.train_on_prompt, sample=sample)
    except UserError as e:  # name the template: the recipe's (its file), or the model's own
        raise type(e)(e.problem, e.fix, e.where or where) from None


def _template_file(path: Path) -> str:
    """A chat template file's text: UTF-8, not empty."""
    text = read_text(path, "the chat template file")
    if not text.strip():
        raise UserError(f"data.chat_template file {path} is empty", "put the Jinja chat template in it")
    return text


def _check_jinja(template: str, where: str) -> None:
    """A syntax error in the template is reported with its line, before TRL renders the first row."""
    from jinja2 import TemplateSyntaxError

    # what apply_chat_template compiles with ({% generation %} included)
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        raise UserError(f"{where}: Jinja syntax error at line {e.lineno}: {e.message}",
                        "fix the chat template (a complete file, every {% ... %} block closed)") from None


def _lengths(ds, tokenizer):
    """Token count of every example exactly as TRL tokenizes it (EOS appended to text/completions)."""
    from trl.data_utils import _tokenize

    eos = tokenizer.eos_token
    family = formats.shape(ds.column_names)

    if family.chat:  # tokenized by prepare (chat.tokenize_dataset)
        return [len(ids) for ids in ds["input_ids"]]

    def count(row):
        text = family.lm_text(row)
        return {"n": len(_tokenize(tokenizer, text if text.endswith(eos) else text + eos)["input_ids"])}

    return ds.map(count, desc="counting tokens")["n"]


def prepare(recipe, tokenizer, built):
    """Chat template, length accounting and the over-length policy. Returns (train, eval, stats)."""
    train, eval_ds, fmt = built
    stats = dict(built.stats)
    family = formats.shape(train.column_names)
    if family.labels:  # a head tokenizes its own (heads.py)
        return train, eval_ds, stats
    if family.chat:
        apply_chat_template_choice(recipe, tokenizer, sample=train[0]["messages"] if len(train) else None)
        only_assistant = not recipe.data.train_on_prompt
        train = chat.tokenize_dataset(train, tokenizer, only_assistant)
        eval_ds = chat.tokenize_dataset(eval_ds, tokenizer, only_assistant) if eval_ds is not None else None
    max_length = getattr(recipe.training, "max_length", None)
    for name, ds in (("train", train), ("eval", eval_ds)):
        if ds is None:
            continue
        lengths = _lengths(ds, tokenizer)
        over = [i for i, n in enumerate(lengths) if max_length and n > max_length]
        lost = sum(lengths[i] - max_length for i in over)
        kept = [n for n in lengths if not max_length or n <= max_length] if recipe.data.over_length == "drop" \
            else [min(n, max_length or n) for n in lengths]
        stats[f"{name}_tokens"] = sum(kept)
        stats[f"{name}_over_length"] = len(over)
        if over and recipe.data.over_length == "drop":
            keep = sorted(set(range(len(ds))) - set(over))
            if not keep and name == "train":
                raise UserError(f"data.over_length: drop dropped every training example: all are longer than "
                                f"training.max_length={max_length} tokens (shortest: {min(lengths)})",
                                "raise training.max_length, or set data.over_length: truncate")
            ds = ds.select(keep)
            stats[f"{name}_dropped_over_length"] = len(over)
            log.warning("data: dropped %d of %d %s examples longer than max_length=%d", len(over), len(lengths),
                        name, max_length)
        elif over:
            stats[f"{name}_truncated_tokens"] = lost
            log.warning("data: truncated %d of %d %s examples to max_length=%d (%d tokens lost, %.1f%%); "
                        "raise training.max_length or set data.over_length: drop", len(over), len(lengths), name,
                        max_length, lost, 100 * lost / max(sum(lengths), 1))
        if name == "train":
            train, stats["lengths"] = ds, kept
        else:
            eval_ds = ds
    return train, eval_ds, stats


def padded_fraction(lengths: list[int], batch_size: int) -> float:
    """Real tokens / slots when batches (in order) are padded to their longest example."""
    slots = sum(len(b) * max(b) for b in (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)))
    return sum(lengths) / max(slots, 1)


def finish_report(recipe, trainer, stats: dict) -> dict:
    """Add what the trainer did to the data (packing fill, fully masked examples TRL dropped); log it."""
    lengths = stats.pop("lengths", None)
    if lengths is None:
        return stats
    t = recipe.training
    batch = getattr(t, "per_device_train_batch_size", 8)
    ds = trainer.train_dataset
    packing = getattr(t, "packing", False)
    # Compare with padded batches holding as many examples per step as the packed batches do.
    padded_batch = max(1, round(len(lengths) / max(len(ds), 1) * batch)) if packing else batch
    stats["padded_batch_size"] = padded_batch
    stats["padded_efficiency"] = round(padded_fraction(lengths, padded_batch), 4)
    if packing:
        max_length = t.max_length
        real = sum(sum(r) for r in ds["seq_lengths"])
        stats["packed_rows"] = len(ds)
        stats["packing_efficiency"] = round(real / (len(ds) * max_length), 4)
        log.info("data: packing %d examples into %d rows of %d: %.1f%% of slots are real tokens "
                 "(padded batches with as many examples, %d, would be %.1f%%)", len(lengths), len(ds), max_length,
                 100 * stats["packing_efficiency"], padded_batch, 100 * stats["padded_efficiency"])
    else:
        dropped = len(lengths) - len(ds)
        if dropped:
            stats["train_fully_masked_dropped"] = dropped
            log.warning("data: %d examples had no supervised token left after truncation and were dropped", dropped)
        log.info("data: padded batches of %d: %.1f%% of slots are real tokens (training.packing: true packs "
                 "them)", batch, 100 * stats["padded_efficiency"])
    return stats


def check_not_empty(trainer, recipe) -> None:
    """TRL drops rows whose completion was truncated away; none left is a recipe problem, not a crash."""
    ds = trainer.train_dataset
    if ds is not None and hasattr(ds, "__len__") and len(ds) == 0:
        max_length = getattr(trainer.args, "max_length", None)
        raise UserError(
            f"no training examples left after tokenization: every row's completion lies beyond "
            f"training.max_length={max_length} tokens (or the data is empty after data.max_samples/filters)",
            "raise training.max_length, shorten the prompts, or set training.truncation_mode=keep_end",
        )
