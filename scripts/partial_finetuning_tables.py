"""Trainable-parameter tables for docs/partial_finetuning.md, on a Llama-2-7B config without weights.

    python scripts/partial_finetuning_tables.py

Models are built on the meta device from a LlamaConfig with Llama-2-7B's dimensions (no download);
the same `freeze:` rules and head builders as a real run decide what trains.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama_recipes

import torch  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from llama_recipes.freeze import apply_freeze, format_table, report  # noqa: E402
from llama_recipes.heads import build_mlp  # noqa: E402
from llama_recipes.schema.freeze import FreezeConfig  # noqa: E402

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        tie_word_embeddings=False)

STRATEGIES = {
    "full (method.name: full)": None,
    "last 2 layers + final norm": {"train": [{"last_layers": 2}, r"^model\.norm\."]},
    "MLPs of the last 4 layers": {"train": [{"last_layers": 4, "modules": ["mlp"]}]},
    "attention of layers 0-7": {"train": [{"layers": ["0-7"], "modules": ["attention"]}]},
    "norms + lm_head": {"train": [{"modules": ["norms", "lm_head"]}]},
    "all but embeddings": {"freeze": [{"modules": ["embeddings"]}]},
}


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def main():
    import logging

    logging.getLogger("llama_recipes").setLevel(logging.WARNING)  # report() logs each table
    rows = []
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(LLAMA2_7B)
        for name, rules in STRATEGIES.items():
            lm.requires_grad_(True)
            if rules:
                apply_freeze(lm, FreezeConfig.model_validate(rules))
            rows.append((name, *count(lm)))
            if name.startswith("last 2"):
                last2 = format_table(report(lm))
        cls = AutoModelForSequenceClassification.from_config(LlamaConfig(**{**LLAMA2_7B.to_dict(), "id2label": {i: str(i) for i in range(4)}}))
        cls.requires_grad_(False)
        cls.score.requires_grad_(True)
        rows.append(("classifier_head (score, 4 labels)", *count(cls)))
        base = AutoModel.from_config(LLAMA2_7B)
        base.requires_grad_(False)
        head = build_mlp(4096, 4, [512], "gelu", 0.1)
        t, n = count(base)
        rows.append(("mlp_head [512], 4 labels", sum(p.numel() for p in head.parameters()),
                     n + sum(p.numel() for p in head.parameters())))
        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(cls, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear",
                                              modules_to_save=["score"]))
        t, n = count(peft)
        rows.append(("classifier_head + LoRA r=8 all-linear", t, n - 4096 * 4))  # minus the saved copy's original
    print("| strategy | trainable | total | trainable % |\n|---|---:|---:|---:|")
    for name, t, n in rows:
        print(f"| {name} | {t:,} | {n:,} | {100 * t / n:.3f} |")
    print("\nPer-group summary printed at start (last 2 layers + final norm), abridged:\n")
    lines = last2.splitlines()
    print("\n".join(lines[:5] + ["| ... | | | |"] + lines[-6:]))


if __name__ == "__main__":
    main()
