"""`data:` section: where the examples come from and how they are turned into training text."""
from typing import Literal

from pydantic import Field

from llama_recipes.schema.base import Section

Format = Literal["auto", "alpaca", "prompt_completion", "chat", "text", "summarization", "classification"]


class DataConfig(Section):
    path: str = Field(
        description="Hub dataset id (tatsu-lab/alpaca), a local .json/.jsonl/.csv/.parquet file or directory, "
        "or builtin:NAME for data shipped in the package (builtin:demo)."
    )
    name: str | None = Field(None, description="Hub dataset config name.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    format: Format = Field("auto", description="How rows are rendered; auto detects it from the columns.")
    split: str = Field("train", description="Split used for training.")
    eval_split: str | float | None = Field(
        None,
        description="Held-out split: a split name, or a fraction (0-1) of `split` carved off with `seed`. "
        "For builtin and local directories, a file named <eval_split>.jsonl also works.",
    )
    max_samples: int | None = Field(None, gt=0, description="Use at most this many training rows.")
    max_eval_samples: int | None = Field(None, gt=0, description="Use at most this many eval rows.")
    seed: int = Field(42, description="Seed for shuffling and the eval fraction split.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping, canonical name -> your column (e.g. {instruction: question, output: answer}).",
    )
    prompt_template: str | None = Field(
        None, description="Python format string for the prompt, with {column} fields; default per format."
    )
