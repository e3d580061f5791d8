"""GGUF export (llama_recipes/gguf_export.py): every trained causal LM as one GGUF that transformers'
own GGUF reader loads back with the same logits and answers, its tokenizer / chat template / stop ids
in the metadata, the LoRA GGUF, the Ollama Modelfile, and clear refusals.

Reuses the method runs of test_methods.py (the `trained` fixture trains each method once per session).
"""
import json

import pytest
import torch
from conftest import ROOT, TINY
from test_methods import SHORT, trained  # noqa: F401  (fixture)

from llama_recipes.errors import UserError
from llama_recipes.schema import load_recipe


def _read(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


_MODEL_RUNS: dict = {}


def model_run(tmp_path_factory, twin: str):
    """A full or partial fine-tune of the tiny model (its artifact is a whole model), once per module."""
    from llama_recipes import pipeline

    if twin not in _MODEL_RUNS:
        out = tmp_path_factory.mktemp(twin) / "out"
        _MODEL_RUNS[twin] = pipeline.train(load_recipe(ROOT / f"recipes/demo/tiny_{twin}.yaml",
                                                       [*SHORT, f"output_dir={out}"]))
    return _MODEL_RUNS[twin]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return model_run(tmp_path_factory, "full")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A chat LoRA run (loss on assistant turns): its template must travel into the GGUF."""
    from llama_recipes import pipeline

    out = tmp_path_factory.mktemp("chat") / "out"
    return pipeline.train(load_recipe(ROOT / "recipes/demo/chat_tiny_lora.yaml", [
        *SHORT, "training.packing=false", "data.eval_split=0.1", f"output_dir={out}"]))


@pytest.mark.parametrize("twin", ["full", "freeze_last2"])
def test_full_run_f32_round_trip_is_exact(tmp_path_factory, tmp_path, twin):
    """F32 of a full / partial fine-tune: every tensor read back by transformers equals the saved one,
    logits to 1e-5."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llama_recipes import gguf_export

    full_run = model_run(tmp_path_factory, twin)
    out = tmp_path / "m.gguf"
    res = gguf_export.main(full_run.output_dir, out, quant="f32")
    v = res["verdict"]
    assert v.ok and v.max_logit_diff <= 1e-5 and v.agree == v.prompts and v.tokenizer_equal, v
    saved = load_file(str(full_run.output_dir / "model.safetensors"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).state_dict()
    assert set(saved) <= set(back)
    for k, t in saved.items():
        assert torch.equal(back[k], t.float()), k  # q/k permuted and un-permuted: bit-identical


@pytest.mark.parametrize("key", ["lora", "dora", "ia3", "qlora4"])
def test_merged_adapter_f32_matches_trained_model(trained, tmp_path, key):  # noqa: F811
    from llama_recipes import gguf_export

    _, run = trained(key)
    v = gguf_export.main(run.output_dir, tmp_path / "m.gguf", quant="f32")["verdict"]
    assert v.ok and v.max_logit_diff <= gguf_export.LOGIT_TOLERANCE["f32"] and v.agree == v.prompts, v


def test_f16_and_q8_0_within_tolerance(trained, tmp_path):  # noqa: F811
    from llama_recipes import gguf_export

    _, run = trained("lora")
    sizes = {}
    for quant in ("f16", "q8_0"):
        res = gguf_export.main(run.output_dir, tmp_path / f"{quant}.gguf", quant=quant)
        v = res["verdict"]
        assert v.ok and v.max_logit_diff <= gguf_export.LOGIT_TOLERANCE[quant], (quant, v)
        assert v.max_logit_diff > 1e-6, (quant, v)  # the weights really were rounded
        sizes[quant] = res["bytes"]
        reader, _ = _read(tmp_path / f"{quant}.gguf")
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == quant.upper()
    assert v.agree == v.prompts  # Q8_0 on the tiny model: same greedy answers too
    assert sizes["q8_0"] < 0.6 * sizes["f16"]


def test_metadata_reads_back_equal(trained, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    from llama_recipes import gguf_export

    _, run = trained("lora")
    out = tmp_path / "m.gguf"
    gguf_export.main(run.output_dir, out, quant="f16", verify_it=False)
    tok = AutoTokenizer.from_pretrained(str(run.output_dir))
    reader, kv = _read(out)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv_: kv_[1])
    assert kv["tokenizer.ggml.tokens"] == [t for t, _ in vocab]
    tj = json.loads((run.output_dir / "tokenizer.json").read_text())
    assert len(kv["tokenizer.ggml.merges"]) == len(tj["model"]["merges"])
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_token_id == 1
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == 2
    assert kv["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert kv["tokenizer.chat_template"] == tok.chat_template
    assert kv[gguf_export.STOP_IDS_KEY] == [2]  # the tiny template ends every turn with </s> = EOS
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    types = kv["tokenizer.ggml.token_type"]
    assert {i for i, t in enumerate(types) if t == 3} == special  # CONTROL
    cfg = json.loads((TINY / "config.json").read_text())
    assert kv["llama.block_count"] == cfg["num_hidden_layers"] and kv["llama.vocab_size"] == cfg["vocab_size"]
    assert kv["general.file_type"] == 1 and kv["general.type"] == "model"
    assert len(reader.tensors) == 3 + 9 * cfg["num_hidden_layers"]


def test_chat_run_keeps_its_template_and_end_of_turn(chat_run, tmp_path):
    from transformers import AutoTokenizer

    from llama_recipes import gguf_export

    out = tmp_path / "chat.gguf"
    res = gguf_export.main(chat_run.output_dir, out, quant="f32", ollama=True)
    v = res["verdict"]
    assert v.ok and v.agree == v.prompts and v.tokenizer_equal, v
    tok = AutoTokenizer.from_pretrained(str(chat_run.output_dir))
    _, kv = _read(out)
    assert kv["tokenizer.chat_template"] == tok.chat_template == (chat_run.output_dir / "chat_template.jinja").read_text()
    assert "{% generation %}" in kv["tokenizer.chat_template"]
    stops = gguf_export.end_of_turn_ids(tok)
    assert kv[gguf_export.STOP_IDS_KEY] == stops and tok.eos_token_id in stops
    # transformers' GGUF tokenizer renders the held-out chats exactly as the run's tokenizer
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    msgs = [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "red green blue"}]
    assert back.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    # the Modelfile's template is the chat template cut into turns; its stop is the end-of-turn token
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./chat.gguf\nTEMPLATE \"\"\"") and 'PARAMETER stop "</s>"' in modelfile
    parts = gguf_export.template_parts(tok)
    convo = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "user", "content": "Again"}]
    assert parts.render(convo) == tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert go_render(parts.go_template(), convo) == parts.render(convo)


def go_render(template: str, messages: list[dict]) -> str:
    """Render the subset of Go's text/template the Modelfile uses (if/else if/range/eq/ne/index/not/or),
    so the TEMPLATE string itself is checked, not only the pieces it was built from."""
    import re

    tokens = re.split(r"(\{\{.*?\}\})", template)
    pos = 0

    def value(expr, msg):
        expr = expr.strip()
        if expr.startswith('"'):
            return json.loads(expr)
        if expr == ".Role":
            return msg["role"]
        if expr == ".Content":
            return msg["content"]
        if expr == ".Messages":
            return messages
        if expr == "(index .Messages 0).Role":
            return messages[0]["role"]
        raise AssertionError(expr)

    def cond(expr, msg):
        expr = expr.strip()
        m = re.fullmatch(r"or \(not \.Messages\) \(ne \(index \.Messages 0\)\.Role (\"\w+\")\)", expr)
        if m:
            return not messages or messages[0]["role"] != json.loads(m.group(1))
        m = re.fullmatch(r"eq \.Role (\"\w+\")", expr)
        if m:
            return msg["role"] == json.loads(m.group(1))
        raise AssertionError(expr)

    def block(msg, stop_at):
        """Render tokens from pos until one of stop_at actions; returns (text, the stopping action)."""
        nonlocal pos
        out = ""
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if not tok.startswith("{{"):
                out += tok
                continue
            action = tok[2:-2].strip()
            if any(action.startswith(s) for s in stop_at):
                return out, action
            if action.startswith("if "):
                taken, done, act = False, False, action
                while True:
                    ok = not done and cond(act[len("else if "):] if act.startswith("else if ") else act[3:], msg)
                    text, act = block(msg, ("else", "end"))
                    if ok:
                        out, done = out + text, True
                    if act == "end":
                        break
                    taken = taken or ok
            elif action == "range .Messages":
                start = pos
                for m in messages:
                    pos = start
                    text, _ = block(m, ("end",))
                    out += text
                if not messages:
                    block(msg, ("end",))
            else:
                out += value(action, msg)
        return out, None

    text, _ = block(None, ())
    return text


def test_lora_gguf_layout_and_product(trained, tmp_path):  # noqa: F811
    """The LoRA GGUF: llama.cpp's adapter keys, one lora_a/lora_b pair per adapted matrix, and applied as
    llama.cpp applies it (W + alpha/rank * B A, q/k rows un-permuted) it answers as the trained adapter."""
    from llama_recipes import gguf_export

    _, run = trained("lora")
    out = tmp_path / "adapter.gguf"
    res = gguf_export.main(run.output_dir, out, fmt="gguf-lora", quant="f32")
    v = res["verdict"]
    assert v.ok and v.max_logit_diff <= gguf_export.LOGIT_TOLERANCE["f32"] and v.agree == v.prompts, v
    reader, kv = _read(out)
    cfg = json.loads((run.output_dir / "adapter_config.json").read_text())
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == cfg["lora_alpha"]
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 * 7 * 4 and "blk.0.attn_q.weight.lora_a" in names and "blk.3.ffn_down.weight.lora_b" in names
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == [128, cfg["r"]]  # ggml order: (in, rank)
    assert shapes["blk.0.attn_q.weight.lora_b"] == [cfg["r"], 128]  # (rank, out): llama.cpp's rank = b->ne[0]


@pytest.mark.parametrize("key,fmt,match", [
    ("prefix", "gguf", "cannot merge a prefix"),
    ("llama_adapter", "gguf", "cannot merge a llama_adapter"),
    ("dora", "gguf-lora", "magnitude vector"),
    ("ia3", "gguf-lora", "IA3 multiplies activations"),
    ("prefix", "gguf-lora", "cannot write a llama.cpp LoRA GGUF for a prefix run"),
])
def test_refusals_name_the_method(trained, tmp_path, key, fmt, match):  # noqa: F811
    from llama_recipes.cli import run_command
    from llama_recipes.gguf_export import main

    _, run = trained(key)
    with pytest.raises(UserError, match=match):
        main(run.output_dir, tmp_path / "x.gguf", fmt=fmt)
    assert run_command("export", [str(run.output_dir), str(tmp_path / "y.gguf"), "--format", fmt]) == 2
    assert not list(tmp_path.iterdir())  # nothing written


def test_refusals_before_loading(full_run, trained, tmp_path, capsys):  # noqa: F811
    from llama_recipes.cli import run_command
    from llama_recipes.gguf_export import main

    head = tmp_path / "head"  # a classification head run: its marker file is what export reads first
    head.mkdir()
    (head / "head_config.json").write_text("{}")
    with pytest.raises(UserError, match="classification head .* not a causal language model"):
        main(head, tmp_path / "h.gguf")
    with pytest.raises(UserError, match="not an adapter: there is no LoRA"):
        main(full_run.output_dir, tmp_path / "f.gguf", fmt="gguf-lora")
    with pytest.raises(UserError, match="ending in .gguf|name it with .gguf"):
        main(full_run.output_dir, tmp_path / "model.bin")
    other = tmp_path / "gpt2"  # an architecture this writer does not lay out
    other.mkdir()
    cfg = json.loads((TINY / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        main(other, tmp_path / "g.gguf")
    _, run = trained("lora")
    (tmp_path / "exists.gguf").write_bytes(b"keep me")
    assert run_command("export", [str(run.output_dir), str(tmp_path / "exists.gguf"), "--format", "gguf"]) == 2
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep me"
    assert "already exists" in capsys.readouterr().err
    assert run_command("export", [str(run.output_dir), str(tmp_path / "m"), "--quant", "q8_0"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf", "gpt2", "head"]


def test_export_cli_gguf_prints_the_verdict(trained, tmp_path, capsys):  # noqa: F811
    from llama_recipes.cli import run_command

    _, run = trained("lora")
    assert run_command("export", [str(run.output_dir), str(tmp_path / "m.gguf"), "--format", "gguf",
                                  "--quant", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "verify (Q8_0, transformers' GGUF loader): max |logit difference|" in out
    assert "greedy continuations identical on" in out and (tmp_path / "m.gguf").is_file()


def test_run_started_from_a_gguf(tmp_path, monkeypatch):
    """GGUF in -> fine-tune -> GGUF out: the exported file keeps the source file's vocabulary."""
    from gguf_tiny import write_tiny_gguf

    from llama_recipes import builtin_models, gguf_export, pipeline

    monkeypatch.setenv(builtin_models.CACHE_ENV, str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    write_tiny_gguf(src / "tiny.gguf")
    run = pipeline.train(load_recipe(ROOT / "recipes/demo/tiny_lora.yaml", [
        *SHORT, f"model.name_or_path={src}", "model.gguf_file=tiny.gguf", f"output_dir={tmp_path / 'run'}"]))
    res = gguf_export.main(run.output_dir, tmp_path / "out.gguf", quant="f32")
    assert res["verdict"].ok and res["verdict"].agree == res["verdict"].prompts, res["verdict"]
    _, kv_src = _read(src / "tiny.gguf")
    _, kv_out = _read(tmp_path / "out.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "llama.block_count"):
        assert kv_out[key] == kv_src[key], key


def test_sentencepiece_style_tokenizer_travels(tmp_path):
    """A Llama-2-style tokenizer (BPE with byte fallback) is written as tokenizer.ggml.model=llama with
    scores from its merge ranks; transformers' GGUF tokenizer then splits held-out text identically.
    (Known difference: text that starts with a space; see docs/export.md.)"""
    from gguf_tiny import write_sentencepiece_style_model
    from transformers import AutoTokenizer

    from llama_recipes import gguf_export

    model = write_sentencepiece_style_model(tmp_path / "model")
    res = gguf_export.main(model, tmp_path / "spm.gguf", quant="f32")
    assert res["verdict"].ok and res["verdict"].max_logit_diff == 0 and res["verdict"].tokenizer_equal, res["verdict"]
    _, kv = _read(tmp_path / "spm.gguf")
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.token_type"][3] == 6  # <0x00>: BYTE
    a = AutoTokenizer.from_pretrained(str(model))
    b = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    rows = [json.loads(line) for line in (ROOT / "llama_recipes/assets/data/demo/eval.jsonl").open()]
    texts = [r["instruction"] + "\n" + (r["input"] + " " + r["output"]).strip() for r in rows] + ["héllo 🦙 wörld"]
    assert [b(t)["input_ids"] for t in texts] == [a(t)["input_ids"] for t in texts]
