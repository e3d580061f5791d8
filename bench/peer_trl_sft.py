"""A plain TRL SFTTrainer script, as a TRL user would write it (the peer of bench_peer.py).

    python bench/peer_trl_sft.py MODEL_DIR DATA.jsonl OUT_DIR [max_steps]
"""
import sys

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def to_prompt_completion(row):
    template = PROMPT if row["input"].strip() else PROMPT_NO_INPUT
    return {"prompt": template.format(**row), "completion": row["output"]}


def build_trainer(model_dir, data_file, out_dir, max_steps=8, peft_config=None, batch=8, max_length=256,
                  **overrides):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = load_dataset("json", data_files=data_file, split="train")
    dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)
    args = SFTConfig(output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                     max_length=max_length, bf16=False, gradient_checkpointing=False, logging_steps=1,
                     save_strategy="no", report_to=[], seed=42, dataloader_drop_last=True, **overrides)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)


if __name__ == "__main__":
    from peft import LoraConfig

    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    trainer = build_trainer(sys.argv[1], sys.argv[2], sys.argv[3], steps, peft_config=lora)
    trainer.train()
    trainer.save_model()
