"""Build the embedded tiny Llama model under ``llama_recipes/assets/tiny-llama/``.

    python scripts/make_tiny_llama.py                 # ~3-4 min on 2 CPU cores
    python scripts/make_tiny_llama.py --steps 50      # quick smoke run
    python scripts/make_tiny_llama.py --out DIR       # write somewhere else

What it does (fp32, CPU, fixed seeds, no network):

1. Generates a generic English corpus of simple templated sentences and short
   stories (animals, food, colours, weather, numbers, names) with the word lists
   and generators of ``scripts/make_demo_data.py``. Rows of
   ``assets/data/retain/generic.jsonl`` are excluded, and the demo instruction
   tasks are NOT part of it: the base model must fail them before fine-tuning.
   Optional (``--copy-frac``, off by default): copy/recall texts
   (``make_demo_data.copy_text``: lists restated in prose or under headings with
   blank lines, first/last items, lists backwards, long unrelated word lists said
   twice). Experimental: with 250-400 steps they taught the format (newlines,
   headings, eos) but NOT in-context copying (no induction), so the demo's exact
   match stayed ~0; not used for the shipped asset.
2. Trains a byte-level BPE tokenizer (``tokenizers``) on that corpus plus the
   texts of the demo datasets and prompt templates, and wraps it as a
   ``PreTrainedTokenizerFast``: bos ``<s>`` added at the start of every encoding
   (like Llama), eos ``</s>`` never added automatically, a distinct pad ``<pad>``,
   unk ``<unk>``, and a ChatML-like chat template (``<|im_start|>role\\n...</s>``)
   with ``{% generation %}`` markers for TRL's ``assistant_only_loss``.
3. Pretrains a ~1.3M-parameter ``LlamaForCausalLM`` (hidden 128, 4 layers, 4 heads,
   2 kv heads (GQA), untied embeddings) from scratch with AdamW on that corpus.
4. Saves config, generation config, fp32 safetensors, tokenizer files and a README,
   loadable offline with ``AutoTokenizer`` / ``AutoModelForCausalLM`` /
   ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_data as dd  # noqa: E402  (same folder, stdlib only)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "llama_recipes" / "assets" / "tiny-llama"
DATA_DIR = REPO_ROOT / "llama_recipes" / "assets" / "data"

BOS, EOS, PAD, UNK, IM_START = "<s>", "</s>", "<pad>", "<unk>", "<|im_start|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START]  # ids 0..4

# ChatML-like; every turn ends with eos so generation stops there. The assistant
# content and its eos are wrapped in generation markers (TRL assistant_only_loss).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALPACA_PROMPTS = [
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
]

README = """# tiny-llama

A ~{params_m:.1f}M-parameter Llama (hidden {hidden}, {layers} layers, {heads} heads, {kv} kv heads,
untied embeddings, fp32) with a {vocab}-token byte-level BPE tokenizer (bos `<s>` added
automatically, eos `</s>`, pad `<pad>`, ChatML-like chat template with generation markers),
pretrained from scratch for {steps} steps on CPU (loss {loss0:.2f} -> {loss1:.2f}) on a generated
corpus of simple English sentences about animals, food, colours, weather and numbers. It
knows no instruction tasks: it exists so recipes and tests run offline in seconds. Rebuild
it with `python scripts/make_tiny_llama.py` (data: `python scripts/make_demo_data.py`).
"""


def build_corpus(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    held_out = set()
    retain = DATA_DIR / "retain" / "generic.jsonl"
    if retain.exists():
        held_out = {json.loads(line)["text"] for line in retain.open(encoding="utf-8")}
    docs = []
    while len(docs) < n_docs:
        t = dd.generic_text(rng)
        if t not in held_out:
            docs.append(t)
    return docs


def tokenizer_extra_texts() -> list[str]:
    """Texts the tokenizer (only) should see: demo data, prompts, chat prompts."""
    texts = [p.replace("{instruction}", "").replace("{input}", "") for p in ALPACA_PROMPTS]
    texts += dd.SYSTEM_PROMPTS
    for path in sorted(DATA_DIR.rglob("*.jsonl")):
        for line in path.open(encoding="utf-8"):
            row = json.loads(line)
            if "messages" in row:
                texts += [m["content"] for m in row["messages"]]
            else:
                texts += [v for v in row.values() if isinstance(v, str)]
    texts += [" ".join(str(i) for i in range(100))]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=[IM_START],
        add_bos_token=True, add_eos_token=False,
        model_max_length=512, padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def token_stream(tok, docs: list[str]) -> "torch.Tensor":
    import torch

    ids: list[int] = []
    for enc in tok(docs)["input_ids"]:  # each starts with bos
        ids.extend(enc)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--docs", type=int, default=60000)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copy-frac", type=float, default=0.0,
                    help="copy/recall documents (make_demo_data.copy_text) added to the corpus, "
                         "as a fraction of --docs; 0 (default) builds the shipped asset")
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()

    docs = build_corpus(args.docs, seed=args.seed + 1)
    tok = train_tokenizer(docs + tokenizer_extra_texts(), args.vocab_size)
    vocab = len(tok)
    print(f"tokenizer: vocab {vocab}, bos {tok.bos_token_id}, eos {tok.eos_token_id}, "
          f"pad {tok.pad_token_id}, unk {tok.unk_token_id} ({time.time() - t0:.1f}s)")

    # Optional copy/recall texts, added after the tokenizer is trained so the
    # vocabulary depends on the generic corpus only (same tokenizer either way).
    train_docs = docs
    if args.copy_frac > 0:
        crng = random.Random(args.seed + 2)
        train_docs = docs + [dd.copy_text(crng) for _ in range(int(args.docs * args.copy_frac))]
        crng.shuffle(train_docs)
    stream = token_stream(tok, train_docs)
    n_chunks = (len(stream) - 1) // args.seq_len
    print(f"corpus: {len(train_docs)} docs, {len(stream)} tokens, {n_chunks} chunks of {args.seq_len}")

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, dtype="float32",
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t1 = time.time()
    first_loss = last_loss = float("nan")
    ema = None
    for step in range(args.steps):
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[s: s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        val = loss.item()
        if step == 0:
            first_loss = val
        ema = val if ema is None else 0.95 * ema + 0.05 * val
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {val:.4f}  (ema {ema:.4f})  {time.time() - t1:.0f}s", flush=True)
    last_loss = ema
    print(f"pretraining loss: start {first_loss:.4f} -> end {last_loss:.4f} (ema) in {time.time() - t1:.0f}s")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # transformers 5 does not serialise add_bos_token/add_eos_token; record them so
    # the loaded tokenizer reports them (the post-processor in tokenizer.json adds bos).
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg.update(add_bos_token=True, add_eos_token=False)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").write_text(README.format(
        params_m=n_params / 1e6, hidden=config.hidden_size, layers=config.num_hidden_layers,
        heads=config.num_attention_heads, kv=config.num_key_value_heads, vocab=vocab,
        steps=args.steps, loss0=first_loss, loss1=last_loss,
    ), encoding="utf-8")

    prompt = "Tom had a red"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen_ids = model.generate(**ids, max_new_tokens=20, do_sample=False)
    print("sample:", repr(tok.decode(gen_ids[0], skip_special_tokens=True)))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
