"""`model:` section: which base model to load and how."""
from typing import Literal

from pydantic import Field, field_validator

from llama_recipes.schema.base import Section, expand_user


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub id (meta-llama/Llama-2-7b-hf), a local model directory, or builtin:tiny-llama "
        "(the tiny Llama shipped inside the package)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    tokenizer: str | None = Field(None, description="Tokenizer id or path; defaults to name_or_path.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the weights are loaded in; auto keeps the checkpoint's dtype."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="Attention kernel; flash_attention_2 needs a GPU and the flash-attn package."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model. Off unless you trust the model's authors."
    )

    _paths = field_validator("name_or_path", "tokenizer")(expand_user)
