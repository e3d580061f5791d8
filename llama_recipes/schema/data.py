"""`data:` section: where the examples come from and how they are turned into training text."""
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llama_recipes import formats
from llama_recipes.schema.base import SEED_MAX, Section, expand_user
from llama_recipes.schema.method import PACKING_UNSAFE_METHODS

# The format names are the registry's (llama_recipes/formats.py: one object per format); auto detects one.
Format = Literal[("auto", *formats.NAMES)]  # type: ignore[valid-type]

# SFTConfig keys that follow from the data (set by llama_recipes.data.sft_overrides, never in `training:`).
DATA_OWNED_SFT_KEYS = {
    "completion_only_loss": "set `data.train_on_prompt` (false: loss on the completion only, the default)",
    "assistant_only_loss": "set `data.train_on_prompt` (false: loss on assistant turns only, the default)",
    "dataset_text_field": "map your column with `data.columns: {text: YOUR_COLUMN}`",
}
# Attention kernels that cannot keep packed samples apart (flex_attention on CPU returned NaN here).
PACKING_SAFE_ATTENTION = {"sdpa", "eager", "flash_attention_2"}


class SourceFields(Section):
    """Where one dataset comes from and how its rows are read."""

    name: str | None = Field(None, description="Hub dataset config name.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    format: Format = Field("auto", description="How rows are rendered; auto detects it from the columns.")
    split: str = Field("train", description="Split used for training.")
    eval_split: str | float | None = Field(
        None,
        description="Held-out split: a split name, or a fraction (0-1) of `split` carved off with `seed`. "
        "For builtin and local directories, a file named <eval_split>.jsonl also works.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping, canonical name -> your column (e.g. {instruction: question, output: answer}). "
        "Canonical names: instruction/input/output (alpaca), prompt/completion, messages (chat), text, "
        "document/summary (summarization), text/label (classification), prompt/chosen/rejected (preference), "
        "prompt/completion/label (unpaired_preference), prompt + the columns rewards read (prompt_only).",
    )
    prompt_template: str | None = Field(
        None, description="Python format string for the prompt, with {column} fields; default per format "
        "(the Alpaca template, or 'Summarize this dialogue:' for summarization)."
    )

    @field_validator("prompt_template")
    @classmethod
    def _format_string(cls, v):
        # Checked here, not when the first row renders (a ValueError/IndexError deep in datasets.map).
        if v is None:
            return v
        import string

        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"not a valid format string ({e}); write {{column}} for a field and {{{{ }}}} for a "
                             "literal brace") from None
        for f in fields:
            if not f.isidentifier():
                raise ValueError(f"field {{{f}}} is not a column name: use {{column}} fields only "
                                 "(no positions, attributes or indices)")
        return v

    @field_validator("columns")
    @classmethod
    def _one_column_each(cls, v):
        seen: dict[str, str] = {}
        for ours, theirs in v.items():
            if theirs in seen:
                raise ValueError(f"{seen[theirs]} and {ours} both map to column {theirs!r}: map each to its own column")
            seen[theirs] = ours
        return v

    @model_validator(mode="after")
    def _fraction(self):
        if isinstance(self.eval_split, float) and not 0 < self.eval_split < 1:
            raise ValueError(f"eval_split as a fraction must be between 0 and 1, got {self.eval_split}")
        return self


class SourceConfig(SourceFields):
    """One entry of `data.mix`; unset keys are taken from the `data:` section."""

    path: str = Field(description="Hub dataset id, local file or directory, or builtin:NAME.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in the training mixture.")
    _paths = field_validator("path")(expand_user)


class DataConfig(SourceFields):
    path: str | None = Field(
        None,
        description="Hub dataset id (tatsu-lab/alpaca), a local .json/.jsonl/.csv/.parquet file or directory, "
        "or builtin:NAME for data shipped in the package (builtin:demo). Or use `mix`.",
    )
    mix: list[SourceConfig] | None = Field(
        None, description="Several datasets mixed by weight (each: path, weight, and any source key above)."
    )
    max_samples: int | None = Field(None, gt=0, description="Use at most this many training rows (after mixing).")
    max_eval_samples: int | None = Field(None, gt=0, description="Use at most this many eval rows.")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed for shuffling, mixing and the eval fraction split.")
    train_on_prompt: bool = Field(
        False, description="Also supervise prompt / user / system tokens (default false: loss on completions "
        "and assistant turns only, prompt tokens labelled -100)."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template (inline, or a path to a .jinja file) replacing the tokenizer's "
        "(saved with the artifact). Any template works: assistant tokens are derived from it, no markers needed."
    )
    _paths = field_validator("path")(expand_user)

    @field_validator("chat_template")
    @classmethod
    def _template_text_or_file(cls, v):
        # No Jinja in it and one line: meant as a path. A missing file must not become the template
        # text (every row would render as the path string).
        if v is not None and "{" not in v and "\n" not in v:
            v = expand_user(v)
        if v is not None and "{" not in v and "\n" not in v and not Path(v).is_file():
            raise ValueError(f"data.chat_template {v!r} is neither a Jinja template (no {{% %}} / {{{{ }}}}) nor an "
                             "existing file; give the path of a .jinja file (relative to where you launch) or the "
                             "template text")
        return v

    label_names: list[str] | None = Field(
        None, description="Classification label set in id order (default: sorted string labels, or 0..max "
        "for integer labels)."
    )
    over_length: Literal["truncate", "drop"] = Field(
        "truncate", description="Examples longer than training.max_length: truncate (counted and reported) or drop."
    )
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="Rows with a missing/empty/wrong-typed field: stop with file, row and column, or "
        "skip them (counted in the log and metrics)."
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.mix is None):
            raise ValueError("set exactly one of data.path (one dataset) or data.mix (a list of datasets)")
        if self.mix is not None and not self.mix:
            raise ValueError("data.mix is empty: list at least one {path: ...}")
        if self.mix is not None and {"name", "revision", "columns"} & self.model_fields_set:
            raise ValueError("with data.mix, set name/revision/columns inside each mix entry")
        return self

    def sources(self) -> list[SourceConfig]:
        """The datasets to load; a mix entry inherits every key it leaves unset from `data:`."""
        if self.mix is None:
            fields = {k: getattr(self, k) for k in SourceFields.model_fields}
            return [SourceConfig(path=self.path, **fields)]
        inherited = {k: getattr(self, k) for k in ("format", "split", "eval_split", "prompt_template")}
        return [src.model_copy(update={k: v for k, v in inherited.items() if k not in src.model_fields_set})
                for src in self.mix]


def check_recipe(recipe) -> None:
    """Cross-section checks for the data (called by Recipe's validator): raise ValueError with the fix."""
    t, d = recipe.training, recipe.data
    for key, fix in DATA_OWNED_SFT_KEYS.items():
        if key in t.model_fields_set:
            raise ValueError(f"training.{key} follows from the data section and is set for you: {fix}")
    packed = getattr(t, "packing", False) or getattr(t, "padding_free", False)
    if packed:
        attn = recipe.model.attn_implementation
        if attn not in PACKING_SAFE_ATTENTION:
            raise ValueError(f"training.packing/padding_free with model.attn_implementation={attn} would let packed "
                             f"samples attend to each other: use one of {sorted(PACKING_SAFE_ATTENTION)}")
        if getattr(t, "packing", False) and getattr(t, "packing_strategy", "bfd") == "wrapped":
            raise ValueError("training.packing_strategy=wrapped concatenates samples without boundaries (attention "
                             "crosses samples): use bfd (the default) or bfd_split")
        if recipe.method.name in PACKING_UNSAFE_METHODS:
            raise ValueError(f"training.packing with method {recipe.method.name} adds the virtual tokens once per "
                             "packed row, not per sample: set training.packing: false")
    if d.over_length == "drop" and getattr(t, "max_length", 1) is None:
        raise ValueError("data.over_length=drop needs training.max_length")
