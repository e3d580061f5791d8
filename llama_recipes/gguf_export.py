"""Write a run as a GGUF file for llama.cpp / Ollama / LM Studio, and prove it answers as trained.

    llama-recipes export RUN OUT.gguf --format gguf [--quant f16|q8_0|f32] [--ollama] [--no-verify]
    llama-recipes export RUN OUT.gguf --format gguf-lora [--quant f32|f16|q8_0]

`--format gguf`: the run's causal LM (a PEFT adapter merged into its base first, a full or partial
fine-tune as saved, a run that started from a GGUF too) as one GGUF: the tensors named, laid out
and quantized the way llama.cpp's convert_hf_to_gguf.py writes them (q/k rows permuted, norms in
F32, Q8_0 falling back to F16 for rows not a multiple of 32), and the tokenizer, its special
tokens, the chat template and the end-of-turn ids as metadata, so llama.cpp stops where the
trained model stops. Tensors are written one at a time: a full run is read tensor by tensor from
its safetensors (peak memory: the largest tensor), an adapter run holds one merged model.

`--format gguf-lora`: the adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m BASE.gguf --lora
FILE`): general.type=adapter, adapter.type=lora, adapter.lora.alpha, `<tensor>.lora_a` /
`.lora_b` pairs (convert_lora_to_gguf.py's layout); llama.cpp scales by alpha / rank.

Verification (on by default): the written file is loaded back by transformers' own GGUF reader,
an implementation independent of this writer, and compared with the trained model on held-out
prompts of the run: largest next-token logit difference (tolerance from the quantization) and
greedy continuations (`verify`). A LoRA GGUF is read back with gguf's reader and applied to the
base in torch (transformers cannot load adapters from GGUF).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from llama_recipes import artifacts, builtin_models, chat, data, export, methods, modeling
from llama_recipes.errors import UserError
from llama_recipes.log import get_logger
from llama_recipes.measure import generation_pairs
from llama_recipes.paths import model_path, tokenizer_path
from llama_recipes.schema import validate_recipe
from llama_recipes.schema.model import ModelConfig

log = get_logger(__name__)

FORMATS = ("gguf", "gguf-lora")
QUANTS = ("f32", "f16", "q8_0")
# Largest next-token |logit difference| verify accepts, per quantization, for a 4-layer model with
# logits of size ~20: differences are divided by max(1, largest reference |logit| / 20), and the
# tolerance grows as sqrt(layers / 4) (independent rounding errors of L layers add up like a random
# walk). F32 holds the same weights: only summation order differs (a merged adapter computes
# (W + BA)x where training computed Wx + B(Ax)). F16 rounds every weight to 2**-11 relative, Q8_0 to
# 1/254 of its 32-value block's largest |value|. Measured (docs/export.md): tiny 4 layers F32 1.8e-5
# (merged LoRA), F16 0.019, Q8_0 0.36; SmolLM2-135M 30 layers F32 0, F16 0.023, Q8_0 0.85.
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 5e-2, "q8_0": 1.0}


def tolerance(quant: str, layers: int) -> float:
    return LOGIT_TOLERANCE[quant] * math.sqrt(max(layers, 4) / 4)


GREEDY_MUST_AGREE = {"f32": True, "f16": True, "q8_0": False}  # Q8_0: agreement reported, not required
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
# llama.cpp's pre-tokenizer names for a few BPE tokenizers, keyed as convert_hf_to_gguf.py keys
# them (sha256 of the token ids of CHK_TXT). A run that started from a GGUF keeps that file's name.
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}
CHK_TXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 '
           '33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s '
           'there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
STOP_IDS_KEY = "llama_recipes.stop_token_ids"  # every id the trained model stops at (eos + end-of-turn)
PER_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


# -- what the run is ----------------------------------------------------------------------------------

@dataclass
class RunInfo:
    path: Path
    kind: str  # "adapter" or "model"
    method: str
    model_cfg: ModelConfig | None  # the base's model section (adapter runs) or the run's own
    config: dict  # the transformers config of the model the GGUF holds
    source_gguf: Path | None = None  # the GGUF the run started from, if any
    recipe: dict | None = None


def inspect_run(run_dir, fmt: str) -> RunInfo:
    """What `run_dir` holds and whether `fmt` can be written from it; a UserError naming why not.

    Reads JSON/YAML only: every refusal comes before a weight loads."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory", "pass a run's output_dir")
    kind = artifacts.detect(path)
    _, recipe = artifacts.read_run(path)
    method = ((recipe or {}).get("method") or {}).get("name")
    if kind == "head":
        raise UserError(f"{path} holds a classification head ({method or 'head'}), not a causal language model: "
                        "llama.cpp and Ollama run text generators, and a head's output is label scores",
                        "serve a head with transformers (llama-recipes eval, heads.load); GGUF export is for "
                        "LoRA/DoRA/QLoRA/IA3, full and partial fine-tuning runs")
    if kind is None:
        raise UserError(f"no model artifact in {path} (no adapter_config.json, config.json or head_config.json)",
                        "train the recipe first, or point at a run's output_dir")
    if kind == "adapter":
        method = export.run_method(path)
        if fmt == "gguf":
            export.check_mergeable(method)  # prefix / prompt tuning / LLaMA-Adapter: refused, with why
        else:
            check_lora_exportable(path, method)
        model_cfg, _ = artifacts.base_model_config(path)
        config = _model_config(model_cfg)
    else:
        if fmt == "gguf-lora":
            raise UserError(f"{path} holds a {method or 'full'} fine-tuned model, not an adapter: there is no "
                            "LoRA to write", f"write the whole model: llama-recipes export {path} OUT.gguf --format gguf")
        model_cfg = ModelConfig(**recipe["model"]) if recipe and recipe.get("model") else None
        config = json.loads((path / "config.json").read_text())
    check_architecture(config, path)
    src = builtin_models.gguf_source(model_cfg) if model_cfg is not None else None
    return RunInfo(path, kind, method or "full", model_cfg, config, src, recipe)


def _model_config(model_cfg: ModelConfig) -> dict:
    """The base's config.json as a dict, from the file's metadata for a GGUF base (no weights)."""
    cfg = builtin_models.gguf_config(model_cfg)
    if cfg is None:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path(model_cfg), revision=model_cfg.revision)
    return cfg.to_dict()


def check_architecture(config: dict, where) -> None:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{where}: GGUF export writes {', '.join(SUPPORTED_ARCHITECTURES)} models; this one is {arch}",
                        "export safetensors (--format safetensors) and convert it with llama.cpp's "
                        "convert_hf_to_gguf.py")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", None):
        raise UserError(f"{where}: rope_type {rope_type!r} needs llama.cpp's rope_freqs tensor, which this writer "
                        "does not produce", "export safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UserError(f"{where}: a Llama with bias terms is not written by this exporter",
                        "export safetensors and convert with llama.cpp's convert_hf_to_gguf.py")


def check_lora_exportable(path: Path, method: str) -> None:
    """Refuse adapters llama.cpp's LoRA loader cannot apply, by name and why."""
    why = {
        "dora": "DoRA rescales each weight column by a learned magnitude vector, which llama.cpp's LoRA format "
                "has no place for",
        "ia3": "IA3 multiplies activations by learned vectors; llama.cpp's adapters are low-rank weight deltas",
    }.get(method)
    if why is None and method not in ("lora", "qlora"):
        why = methods.get(method).why_not_mergeable if method in methods.REGISTRY else "it is not a LoRA adapter"
        why = f"{method}: {why}"
    if why:
        raise UserError(f"cannot write a llama.cpp LoRA GGUF for a {method} run: {why}",
                        f"write the merged model instead: llama-recipes export {path} OUT.gguf --format gguf")
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
        raise UserError("the adapter also trains whole modules or token rows (modules_to_save / trainable tokens), "
                        "which a llama.cpp LoRA cannot carry", f"write the merged model: llama-recipes export {path} "
                        "OUT.gguf --format gguf")
    if cfg.get("use_dora"):
        raise UserError("the adapter uses DoRA (use_dora: true); llama.cpp's LoRA format has no magnitude vector",
                        f"write the merged model: llama-recipes export {path} OUT.gguf --format gguf")


def check_output(out) -> Path:
    out = Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"{out}: a GGUF export writes one file", f"name it with .gguf, e.g. {out}.gguf" if out.name
                        else "pass a file name ending in .gguf")
    if out.exists():
        raise UserError(f"{out} already exists", "choose a new file name (export never overwrites)")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a directory", "choose a file inside a directory")
    return out


# -- tensors ------------------------------------------------------------------------------------------

def permute(w, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.LlamaModel.permute); transformers' reader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head: int):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a transformers Llama tensor (None: not stored, e.g. rotary caches)."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in GLOBAL:
        return f"{GLOBAL[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in PER_LAYER:
        return f"blk.{parts[2]}.{PER_LAYER['.'.join(parts[3:])]}.{suffix}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise UserError(f"tensor {hf_name} has no llama.cpp name", "this model has parts a Llama GGUF cannot hold; "
                    "export safetensors and convert with llama.cpp's convert_hf_to_gguf.py")


def tensor_type(name: str, shape, quant: str):
    """The GGML type llama.cpp's converter gives a tensor: norms and vectors F32; Q8_0 rows must be
    whole 32-value blocks, else F16 (the converter's QuantError fallback)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if quant == "q8_0":
        return T.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0 else T.F16
    return {"f32": T.F32, "f16": T.F16}[quant]


def encode(array, qtype):
    """float32 numpy array -> the bytes (as an array) GGUF stores for `qtype`."""
    import gguf
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.float32)
    return gguf.quants.quantize(array, qtype)


def _nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return n // block * size


class TensorSource:
    """(name, shape) of every tensor and a getter for one at a time, as float32 torch tensors."""

    def __init__(self, shapes: dict[str, tuple], get):
        self.shapes, self.get = shapes, get

    @classmethod
    def from_safetensors(cls, files: list[Path]) -> TensorSource:
        from safetensors import safe_open

        where, shapes = {}, {}
        for f in files:
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    where[k] = f
                    shapes[k] = tuple(sf.get_slice(k).get_shape())

        def get(name):
            with safe_open(str(where[name]), "pt") as sf:
                return sf.get_tensor(name).float()

        return cls(shapes, get)

    @classmethod
    def from_model(cls, model) -> TensorSource:
        sd = model.state_dict()
        return cls({k: tuple(v.shape) for k, v in sd.items()}, lambda k: sd[k].detach().float())


def model_tensors(info: RunInfo, dtype: str | None = None) -> tuple[TensorSource, object | None]:
    """The tensors of the run's causal LM: (source, the in-memory model if one had to be built)."""
    if info.kind == "model":
        files = sorted(info.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{info.path} has config.json but no *.safetensors", "point at a complete run's output_dir")
        return TensorSource.from_safetensors(files), None
    from peft import PeftModel

    base, _ = export.load_base_for_merge(info.path, dtype)
    model = PeftModel.from_pretrained(base, str(info.path)).merge_and_unload()
    return TensorSource.from_model(model), model


def gguf_tensors(src: TensorSource, config: dict, quant: str):
    """[(gguf name, hf name, shape, ggml type)] in llama.cpp's order (as the HF state dict lists them)."""
    rows = []
    tied = config.get("tie_word_embeddings", False)
    for hf in src.shapes:
        name = gguf_name(hf)
        if name is None or (tied and name == "output.weight"):
            continue  # llama.cpp reuses token_embd when output.weight is absent
        shape = src.shapes[hf]
        rows.append((name, hf, shape, tensor_type(name, shape, quant)))
    return rows


def converted(src: TensorSource, hf: str, config: dict, qtype):
    t = src.get(hf).numpy()
    if hf.endswith("self_attn.q_proj.weight"):
        t = permute(t, config["num_attention_heads"])
    elif hf.endswith("self_attn.k_proj.weight"):
        t = permute(t, config.get("num_key_value_heads") or config["num_attention_heads"])
    return encode(t, qtype)


# -- metadata -----------------------------------------------------------------------------------------

def _file_type(quant: str):
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0}[quant]


def add_model_params(w, config: dict, name: str, quant: str) -> None:
    """The llama.* keys convert_hf_to_gguf.py's LlamaModel writes."""
    import gguf

    heads = config["num_attention_heads"]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config.get("num_key_value_heads") or heads)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        w.add_rope_freq_base(theta)
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_file_type(_file_type(quant))
    w.add_vocab_size(config["vocab_size"])
    w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _looks_special(text: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special
    return text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>")) \
        or (text.startswith("<｜") and text.endswith("｜>")) or text.startswith(("<start_of_", "<end_of_"))


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) by id, padded to the model's vocab size (convert_hf_to_gguf's get_vocab_base)."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = reverse[i]
            special = added[i].special or _looks_special(text)
            tokens.append(text if special else text.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def pre_tokenizer(tokenizer, source: Path | None, n_tokens: int) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's when the vocabulary is unchanged, else by hash."""
    if source is not None:
        import gguf

        reader = gguf.GGUFReader(str(source))
        pre, toks = reader.fields.get("tokenizer.ggml.pre"), reader.fields.get("tokenizer.ggml.tokens")
        if pre is not None and toks is not None and len(toks.data) == n_tokens:
            return pre.contents()
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHK_TXT)).encode()).hexdigest()
    if chkhsh in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[chkhsh]
    log.warning("the tokenizer's pre-tokenizer is not one llama.cpp names (hash %s...): writing 'default'; "
                "llama.cpp may split text differently from transformers (verify compares transformers only)",
                chkhsh[:12])
    return "default"


def tokenizer_kind(tokenizer) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (SentencePiece-style BPE with byte fallback)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise UserError(f"the run's tokenizer is a {model.get('type', 'slow/unknown')} tokenizer; GGUF export writes "
                    "byte-level BPE (Llama 3, SmolLM) and SentencePiece-style BPE (Llama 2) tokenizers",
                    "export safetensors and convert with llama.cpp's convert_hf_to_gguf.py")


def end_of_turn_ids(tokenizer) -> list[int]:
    """Every id the trained model's generation stops at: the chat template's end-of-turn token(s), then EOS."""
    return chat.stop_token_ids(tokenizer)


def add_tokenizer(w, tok_dir: Path, tokenizer, config: dict, source: Path | None) -> dict:
    """tokenizer.ggml.* and tokenizer.chat_template; returns what was written (for the log and Modelfile)."""
    import gguf

    kind = tokenizer_kind(tokenizer)
    tokens, types = vocab_tokens(tokenizer, config["vocab_size"])
    w.add_tokenizer_model(kind)
    if kind == "gpt2":
        w.add_tokenizer_pre(pre_tokenizer(tokenizer, source, len(tokens)))
        w.add_token_list(tokens)
        w.add_token_types(types)
    else:
        vocab = gguf.LlamaHfVocab(tok_dir)
        # LlamaHfVocab scores every token -1000, but SentencePiece-style BPE merges by score (llama.cpp,
        # and transformers' GGUF reader rebuilding the merges): score each token by its merge rank.
        merges = json.loads((tok_dir / "tokenizer.json").read_text())["model"].get("merges") or []
        rank = {}
        for i, m in enumerate(merges):
            rank.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), i)
        toks, scores, ttypes = [], [], []
        for text, _, ttype in vocab.all_tokens():
            toks.append(text)
            scores.append(-float(rank[text.decode("utf-8")]) if text.decode("utf-8", "replace") in rank else 0.0)
            ttypes.append(ttype)
        for i in range(len(toks), config["vocab_size"]):
            toks.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            ttypes.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_pre("default")
        w.add_token_list(toks)
        w.add_token_scores(scores)
        w.add_token_types(ttypes)
        tokens = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in toks]
    special = gguf.SpecialVocab(tok_dir, load_merges=kind == "gpt2", n_vocab=len(tokens))
    # Whether BOS/EOS are added is what the tokenizer does, not what a config file may leave out
    # (llama.cpp's default differs by tokenizer type).
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bos is not None and bool(probe) and probe[0] == bos
    special.add_special_token["eos"] = eos is not None and bool(probe) and probe[-1] == eos
    special.add_to_gguf(w, quiet=True)
    stops = end_of_turn_ids(tokenizer)
    eos = tokenizer.eos_token_id
    turn = [t for t in stops if t != eos]
    if turn:
        w.add_eot_token_id(turn[0])  # llama.cpp ends generation at eos, eot and eom
    if stops:
        w.add_array(STOP_IDS_KEY, stops)
    template = getattr(tokenizer, "chat_template", None)
    if template and special.chat_template is None:  # a template the tokenizer holds but SpecialVocab did not find
        w.add_chat_template(template)
    return {"stop_ids": stops, "stop_tokens": [tokens[t] for t in stops], "template": template, "tokens": tokens}


# -- writing ------------------------------------------------------------------------------------------

def _run_tokenizer(info: RunInfo):
    """(directory holding the run's tokenizer files, the tokenizer) - the run's own when it saved one."""
    from transformers import AutoTokenizer

    if (info.path / "tokenizer_config.json").is_file():
        tok_dir = info.path
    elif info.model_cfg is not None:
        tok_dir = Path(tokenizer_path(info.model_cfg))
    else:
        raise UserError(f"{info.path} has no tokenizer files and no recipe.yaml naming one",
                        "point at a run's output_dir (training saves the tokenizer there)")
    return tok_dir, AutoTokenizer.from_pretrained(str(tok_dir))


def write_model_gguf(info: RunInfo, out: Path, quant: str, dtype: str | None = None) -> dict:
    """Write `info`'s causal LM to `out` (atomically: a .partial file renamed at the end); returns a summary."""
    import time

    import gguf

    started = time.time()
    tok_dir, tokenizer = _run_tokenizer(info)
    src, model = model_tensors(info, dtype)
    config = dict(info.config)
    if model is not None:  # a merged adapter: the architecture of the model in memory
        config = {**model.config.to_dict(), "architectures": config.get("architectures")}
    rows = gguf_tensors(src, config, quant)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), SUPPORTED_ARCHITECTURES[config["architectures"][0]])
    try:
        add_model_params(w, config, info.path.name, quant)
        written = add_tokenizer(w, tok_dir, tokenizer, config, info.source_gguf)
        for name, _, shape, qtype in rows:
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                import numpy as np

                w.add_tensor_info(name, shape, np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16,
                                  _nbytes(shape, qtype))
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                import numpy as np

                w.add_tensor_info(name, byte_shape, np.uint8, _nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, hf, _, qtype in rows:  # one tensor in memory at a time (plus the merged model, if any)
            w.write_tensor_data(converted(src, hf, config, qtype))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    del model
    size = out.stat().st_size
    log.debug("wrote %s (%s, %.1f MiB, %d tensors) in %.1f s", out, quant.upper(), size / 2**20, len(rows),
             time.time() - started)
    return {"path": out, "bytes": size, "seconds": time.time() - started, "tensors": len(rows),
            "stop_ids": written["stop_ids"], "stop_tokens": written["stop_tokens"], "template": written["template"]}


def write_lora_gguf(info: RunInfo, out: Path, quant: str = "f32") -> dict:
    """The run's LoRA adapter as a llama.cpp LoRA GGUF (convert_lora_to_gguf.py's layout)."""
    import time

    import gguf
    import numpy as np
    from safetensors import safe_open

    started = time.time()
    cfg = json.loads((info.path / "adapter_config.json").read_text())
    config = info.config
    alpha = float(cfg["lora_alpha"])
    pairs: dict[str, dict[str, str]] = {}
    with safe_open(str(info.path / "adapter_model.safetensors"), "pt") as sf:
        keys = list(sf.keys())
        shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in keys}
    for k in keys:
        if ".lora_A." in k or ".lora_B." in k:
            base = k.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
            pairs.setdefault(base, {})["A" if ".lora_A." in k else "B"] = k
        else:
            raise UserError(f"adapter tensor {k} is not a lora_A/lora_B matrix", "write the merged model instead "
                            f"(--format gguf)")
    rows = []
    for base, ab in pairs.items():
        name = gguf_name(base)
        rank = shapes[ab["A"]][0]
        # llama.cpp scales every pair by alpha / rank; PEFT by scaling[name] (rank_pattern, alpha_pattern,
        # rsLoRA). Where they differ the factor is folded into lora_b, so the product is what PEFT applied.
        scale = _peft_scale(cfg, base, rank)
        for part, key in (("lora_a", ab["A"]), ("lora_b", ab["B"])):
            shape = shapes[key]
            rows.append((f"{name}.{part}", key, shape, tensor_type(f"{name}.{part}", shape, quant),
                         scale / (alpha / rank) if part == "lora_b" else 1.0, base))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), SUPPORTED_ARCHITECTURES[config["architectures"][0]])
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_name(info.path.name)
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_file_type(_file_type(quant))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, _, shape, qtype, _, _ in rows:
            if qtype == gguf.GGMLQuantizationType.Q8_0:
                w.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shape, qtype), np.uint8, _nbytes(shape, qtype),
                                  raw_dtype=qtype)
            else:
                w.add_tensor_info(name, shape, np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16,
                                  _nbytes(shape, qtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with safe_open(str(info.path / "adapter_model.safetensors"), "pt") as sf:
            for name, key, _, qtype, factor, base in rows:
                t = sf.get_tensor(key).float().numpy() * np.float32(factor)
                if name.endswith(".lora_b") and base.endswith("self_attn.q_proj.weight"):
                    t = permute(t, config["num_attention_heads"])  # rows of B are rows of the delta
                elif name.endswith(".lora_b") and base.endswith("self_attn.k_proj.weight"):
                    t = permute(t, config.get("num_key_value_heads") or config["num_attention_heads"])
                w.write_tensor_data(encode(t, qtype))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    log.debug("wrote LoRA %s (%s, %.2f MiB, %d pairs, alpha %g) in %.1f s", out, quant.upper(), size / 2**20,
             len(pairs), alpha, time.time() - started)
    return {"path": out, "bytes": size, "seconds": time.time() - started, "pairs": len(pairs), "alpha": alpha}


def _peft_scale(cfg: dict, base_name: str, rank: int) -> float:
    """The scaling PEFT applies to one LoRA pair (lora_alpha / r, rsLoRA: / sqrt(r), per-module patterns)."""
    import re

    alpha = cfg["lora_alpha"]
    for pattern, a in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}(\.|$)", base_name.rsplit(".weight", 1)[0]) or \
                base_name.rsplit(".weight", 1)[0].endswith(pattern):
            alpha = a
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


# -- Ollama -------------------------------------------------------------------------------------------

S, U, A = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01"


@dataclass
class TemplateParts:
    """A chat template cut into the pieces an Ollama (Go) template is built from."""

    prefix: str  # before the first message (e.g. BOS)
    default_system: str  # inserted when the conversation does not start with a system message
    wrap: dict = field(default_factory=dict)  # role -> (before content, after content)
    generation: str = ""  # the generation prompt

    def render(self, messages: list[dict]) -> str:
        """What the Go template renders for `messages` + generation prompt (to check against Jinja)."""
        text = self.prefix
        if not messages or messages[0]["role"] != "system":
            text += self.default_system
        for m in messages:
            before, after = self.wrap[m["role"]]
            text += before + m["content"] + after
        return text + self.generation

    def go_template(self) -> str:
        def esc(s):  # text outside actions is copied verbatim; only "{{" would start an action
            return s.replace("{{", '{{ "{{" }}')

        # No whitespace-trimming markers ({{-): the template's own newlines are part of the turns.
        lines = [esc(self.prefix)]
        if self.default_system:
            lines.append('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                         + esc(self.default_system) + "{{ end }}")
        lines.append("{{ range .Messages }}")
        branches = []
        for role, (before, after) in self.wrap.items():
            branches.append(f'{{{{ {"if" if not branches else "else if"} eq .Role "{role}" }}}}'
                            f"{esc(before)}{{{{ .Content }}}}{esc(after)}")
        lines.append("".join(branches) + "{{ end }}")
        lines.append("{{ end }}" + esc(self.generation))
        return "".join(lines)


def template_parts(tokenizer) -> TemplateParts:
    """Cut the tokenizer's chat template into per-role wrappers by rendering probe conversations."""
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    sys_, usr, ast = ({"role": "system", "content": S}, {"role": "user", "content": U},
                      {"role": "assistant", "content": A})
    one_sys = render([sys_])
    sys_user = render([sys_, usr])
    full = render([sys_, usr, ast])
    gen = render([sys_, usr], gen=True)
    user_only = render([usr])
    if not (sys_user.startswith(one_sys) and full.startswith(sys_user) and gen.startswith(sys_user)):
        raise ValueError("the template does not render a conversation as a concatenation of its turns")

    def around(text, sentinel):
        i = text.index(sentinel)
        return text[:i], text[i + len(sentinel):]

    prefix, sys_after = around(one_sys, S)
    # the prefix is what precedes every conversation; the rest before S is the system wrapper
    user_before, user_after = around(sys_user[len(one_sys):], U)
    ast_before, ast_after = around(full[len(sys_user):], A)
    head, _ = around(user_only, U)
    # before the user's text with no system message: prefix + (default system) + user wrapper
    if not head.endswith(user_before):
        raise ValueError("the user turn renders differently without a system message")
    head = head[:len(head) - len(user_before)]
    common = os.path.commonprefix([prefix, head])
    sys_before = prefix[len(common):]
    prefix = common
    default_system = head[len(common):]
    parts = TemplateParts(prefix, default_system, {"system": (sys_before, sys_after), "user": (user_before, user_after),
                                                   "assistant": (ast_before, ast_after)}, gen[len(sys_user):])
    # The cut must reproduce the template on a real multi-turn conversation, or it is not used.
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye"}]
    for msgs in (probe, [{"role": "system", "content": "Be brief."}, *probe]):
        if parts.render(msgs) != render(msgs, gen=True):
            raise ValueError("the cut template does not reproduce a multi-turn conversation")
    return parts


def write_modelfile(gguf_path: Path, tokenizer, stop_tokens: list[str]) -> Path:
    """An Ollama Modelfile next to the GGUF: FROM, TEMPLATE (from the chat template), stop parameters."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--ollama needs a chat template, and the run's tokenizer has none",
                        "train with a chat template (data.chat_template) or use the GGUF without Ollama")
    try:
        parts = template_parts(tokenizer)
    except (ValueError, Exception) as e:  # jinja errors are not ValueErrors
        raise UserError(f"--ollama: the chat template cannot be written as an Ollama template ({e})",
                        "write the Modelfile's TEMPLATE by hand; the GGUF itself carries the template") from None
    path = gguf_path.parent / "Modelfile"
    if path.exists():
        raise UserError(f"{path} already exists", "choose another directory for the GGUF (export never overwrites)")
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{parts.go_template()}"""']
    lines += [f"PARAMETER stop {json.dumps(t)}" for t in dict.fromkeys(stop_tokens)]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- verification -------------------------------------------------------------------------------------

@dataclass
class Verdict:
    max_logit_diff: float
    tolerance: float
    agree: int
    prompts: int
    near_ties: int  # greedy continuations that part where the reference's top-2 margin is within tolerance
    tokenizer_equal: bool
    ok: bool
    problems: list[str]

    def line(self, quant: str) -> str:
        return (f"verify ({quant.upper()}, transformers' GGUF loader): max |logit difference| {self.max_logit_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}); greedy continuations identical on {self.agree}/{self.prompts} "
                f"held-out prompts" + (f" ({self.near_ties} part at a near-tie)" if self.near_ties else "")
                + f"; tokenizer {'identical' if self.tokenizer_equal else 'DIFFERENT'}")


def held_out_prompts(info: RunInfo, tokenizer, n: int) -> tuple[list[str], bool, list[int]]:
    """(prompts, add_special_tokens, stop ids): the run's held-out prompts as its eval renders them."""

    stops = end_of_turn_ids(tokenizer)
    if info.recipe:
        try:
            recipe = validate_recipe(info.recipe, str(info.path / artifacts.RECIPE_FILE))
            built = data.build_datasets(recipe.data)
            raw = built[1]
            if raw is not None:
                if "messages" in raw.column_names:
                    chat.install_template(tokenizer, recipe.data.chat_template)
                pairs = generation_pairs(raw.select(range(min(len(raw), 4 * n))), tokenizer)
                if pairs:
                    prompts, _, special, stop = pairs
                    return prompts[:n], special, stop or stops
                if "text" in raw.column_names:
                    return [t[:200] for t in raw["text"][:n]], True, stops
        except (UserError, OSError) as e:
            log.warning("verify: the run's held-out data cannot be read (%s); using fixed prompts", e)
    return ["The quick brown fox", "Once upon a time", "def add(a, b):", "The capital of France is"][:n], True, stops


def _greedy(model, ids, max_new_tokens: int, stop: list[int], pad: int):
    import torch

    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=pad, output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, ids["input_ids"].shape[1]:].tolist(), [s[0] for s in out.scores]


def top2_margins(scores) -> list[float]:
    """Per generated position: the gap between the best and the second-best logit."""
    return [float(v[0] - v[1]) for v in (s.float().topk(2).values for s in scores)]


def parting_margin(mine: list[int], theirs: list[int], margins: list[float]) -> float | None:
    """Where two greedy continuations part, the reference's top-2 margin there (None past its scores)."""
    k = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
    return margins[k] if k < len(margins) else None


def _trim(seq: list[int], stop: list[int]) -> list[int]:
    for i, t in enumerate(seq):
        if t in stop:
            return seq[:i + 1]
    return seq


def verify(info: RunInfo, gguf_path: Path, quant: str, reference=None, ref_tokenizer=None, prompts: int = 8,
           max_new_tokens: int = 24) -> Verdict:
    """Load `gguf_path` with transformers' GGUF reader and compare it with the trained model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if reference is None:
        ref_tokenizer, reference = load_trained(info)
    reference.eval()
    texts, special, stop = held_out_prompts(info, ref_tokenizer, prompts)
    kw = {"gguf_file": gguf_path.name}
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    tol = tolerance(quant, info.config.get("num_hidden_layers", 4))
    worst, agree, ties, tok_equal, problems = 0.0, 0, 0, True, []
    for text in texts:
        ids = ref_tokenizer(text, return_tensors="pt", add_special_tokens=special)
        if tok(text, add_special_tokens=special)["input_ids"] != ids["input_ids"][0].tolist():
            tok_equal = False
        with torch.inference_mode():
            a = reference(**ids).logits[0].float()
            b = loaded(**ids).logits[0].float()
        scale = max(1.0, float(a.abs().max()) / 20)
        worst = max(worst, float((a - b).abs().max()) / scale)
        mine, ref_scores = _greedy(reference, ids, max_new_tokens, stop, ref_tokenizer.pad_token_id or 0)
        theirs, _ = _greedy(loaded, ids, max_new_tokens, stop, ref_tokenizer.pad_token_id or 0)
        mine, theirs = _trim(mine, stop), _trim(theirs, stop)
        if mine == theirs:
            agree += 1
            continue
        # A near-tie: where they part, the reference's top-2 margin is within twice this prompt's
        # measured logit difference, so the file's rounding alone can flip the choice.
        margin = parting_margin(mine, theirs, top2_margins(ref_scores))
        if margin is not None and margin <= 2 * float((a - b).abs().max()):
            ties += 1
        elif GREEDY_MUST_AGREE[quant]:
            problems.append(f"greedy continuation of {text[:40]!r} differs at token {k}: "
                            f"{ref_tokenizer.decode(mine)!r} vs {ref_tokenizer.decode(theirs)!r}")
    if worst > tol:
        problems.insert(0, f"max |logit difference| {worst:.3g} exceeds the {quant.upper()} tolerance {tol:.3g}")
    if not tok_equal:
        problems.append("the tokenizer read back from the GGUF splits a held-out prompt differently")
    return Verdict(worst, tol, agree, len(texts), ties, tok_equal, not problems, problems)


def load_trained(info: RunInfo):
    """(tokenizer, model) exactly as the run left them (an adapter on its base, unmerged)."""
    if info.kind == "adapter":
        from peft import PeftModel

        # LLM.int8 also quantizes the activations of every matmul, which no dense file reproduces:
        # an 8-bit QLoRA run is compared as the adapter on its dequantized base (tests/test_export.py).
        eight_bit = ((info.recipe or {}).get("method") or {}).get("bits") == 8
        base, _ = export.load_base_for_merge(info.path, dequantize=eight_bit)
        model = PeftModel.from_pretrained(base, str(info.path), autocast_adapter_dtype=False)
    else:
        cfg = info.model_cfg or ModelConfig(name_or_path=str(info.path))
        model = modeling.load_model(cfg.model_copy(update={"name_or_path": str(info.path), "revision": None,
                                                           "gguf_file": None}))
    _, tokenizer = _run_tokenizer(info)
    return tokenizer, model


def read_lora_gguf(path: Path) -> tuple[float, dict]:
    """(alpha, {llama.cpp base tensor name: (A, B) float32 numpy}) of a LoRA GGUF (gguf's reader)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    alpha = float(r.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    pairs: dict = {}
    for t in r.tensors:
        base, part = t.name.rsplit(".", 1)
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        pairs.setdefault(base, {})[part] = data.reshape([int(x) for x in reversed(t.shape)]) if data.ndim == 1 \
            else data
    return alpha, {k: (v["lora_a"], v["lora_b"]) for k, v in pairs.items()}


def verify_lora(info: RunInfo, lora_path: Path, quant: str, prompts: int = 4) -> Verdict:
    """Apply the LoRA GGUF to the base as llama.cpp does (W + alpha/rank * B A, q/k rows un-permuted)
    and compare with the trained adapter (PeftModel) on held-out prompts."""
    import torch

    tokenizer, trained = load_trained(info)
    trained.eval()
    base, _ = export.load_base_for_merge(info.path, "float32")
    alpha, pairs = read_lora_gguf(lora_path)
    by_name = {gguf_name(k): k for k in base.state_dict()}
    sd = base.state_dict()
    heads = info.config["num_attention_heads"]
    kv = info.config.get("num_key_value_heads") or heads
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            b = b.astype("float32")
            if ".attn_q." in name:
                b = unpermute(b, heads)
            elif ".attn_k." in name:
                b = unpermute(b, kv)
            delta = torch.from_numpy(b) @ torch.from_numpy(a.astype("float32")) * (alpha / a.shape[0])
            sd[by_name[name]].add_(delta.to(sd[by_name[name]].dtype))
    base.eval()
    texts, special, stop = held_out_prompts(info, tokenizer, prompts)
    tol = tolerance(quant, info.config.get("num_hidden_layers", 4))
    worst, agree = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=special)
        with torch.inference_mode():
            x, y = trained(**ids).logits[0].float(), base(**ids).logits[0].float()
        worst = max(worst, float((x - y).abs().max()) / max(1.0, float(x.abs().max()) / 20))
        agree += _trim(_greedy(trained, ids, 12, stop, tokenizer.pad_token_id or 0)[0], stop) == \
            _trim(_greedy(base, ids, 12, stop, tokenizer.pad_token_id or 0)[0], stop)
    problems = [f"max |logit difference| {worst:.3g} exceeds {tol:g}"] if worst > tol else []
    return Verdict(worst, tol, agree, len(texts), 0, True, not problems, problems)


# -- the command --------------------------------------------------------------------------------------

def main(run_dir, out, fmt: str = "gguf", quant: str = "f16", ollama: bool = False, verify_it: bool = True,
         dtype: str | None = None) -> dict:
    """`llama-recipes export RUN OUT.gguf --format gguf|gguf-lora`; prints the verification line."""
    if fmt not in FORMATS:
        raise UserError(f"unknown GGUF format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise UserError(f"unknown quantization {quant!r}", f"use one of {', '.join(QUANTS)}")
    if ollama and fmt != "gguf":
        raise UserError("--ollama writes a Modelfile for a whole model", "use it with --format gguf")
    out = check_output(out)
    info = inspect_run(run_dir, fmt)
    if ollama and (out.parent / "Modelfile").exists():
        raise UserError(f"{out.parent / 'Modelfile'} already exists", "choose another directory (export never overwrites)")
    if fmt == "gguf-lora":
        result = write_lora_gguf(info, out, quant)
        print(f"wrote {out} (llama.cpp LoRA, {quant.upper()}, {result['bytes'] / 2**20:.2f} MiB, alpha "
              f"{result['alpha']:g}); run it: llama-cli -m BASE.gguf --lora {out}")
        if verify_it:
            v = verify_lora(info, out, quant)
            result["verdict"] = v
            print(v.line(quant).replace("transformers' GGUF loader", "gguf reader, applied as llama.cpp does"))
            if not v.ok:
                raise UserError("verification failed: " + "; ".join(v.problems), "report this with the run directory")
        return result
    result = write_model_gguf(info, out, quant, dtype)
    print(f"wrote {out} ({quant.upper()}, {result['bytes'] / 2**20:.1f} MiB, {result['seconds']:.1f} s); "
          f"stops at {', '.join(result['stop_tokens']) or 'EOS'}")
    if ollama:
        _, tokenizer = _run_tokenizer(info)
        result["modelfile"] = write_modelfile(out, tokenizer, result["stop_tokens"])
        print(f"wrote {result['modelfile']} (ollama create NAME -f {result['modelfile']})")
    if verify_it:
        v = verify(info, out, quant)
        result["verdict"] = v
        print(v.line(quant))
        if not v.ok:
            raise UserError("verification failed: " + "; ".join(v.problems),
                            "the file is kept for inspection; report this with the run directory")
    return result
