"""Chat data: which tokens of a conversation the model is trained on, for any chat template.

Most real chat templates (Llama 3, Qwen2, Mistral, SmolLM) have no `{% generation %}` markers, so
the assistant tokens are derived from the template itself, by rendering the conversation prefix
by prefix. For the assistant message i:

    before  = render(messages[:i], add_generation_prompt=True)   the context, ending in the template's
                                                                 generation prompt (`<|im_start|>assistant\\n`)
    through = render(messages[:i + 1])                            the same conversation ending in message i
    full    = render(messages)

`before` must be a prefix of `through`, and `through` of `full` (the prefix property; a template
may close the whole conversation with special tokens after its last message, as Phi-3 appends
EOS). The assistant span starts at `len(before)`: what the model produces at inference after the
generation prompt. It ends after the first run of special tokens following the message's content,
the end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`; Command R's
`<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`): generation stops there, so what the template writes
after it (ChatML's newline) is never generated and not supervised. The spans become a token mask
the way transformers turns `{% generation %}` spans into `assistant_masks` (every token
overlapping a span), so on a template whose markers wrap the content through the end-of-turn
token both masks agree token for token (tests/test_chat.py).

The end-of-turn token IS supervised (the model learns to stop); the generation-prompt header,
system, user and tool turns are not. Training (data.prepare hands TRL input_ids + assistant_masks)
and `--eval-only` (measure.tokenize_like_trl) tokenize through `tokenize` here, so they supervise
the same tokens.
"""
from pathlib import Path

from llama_recipes import bounds
from llama_recipes.errors import UserError
from llama_recipes.log import get_logger

log = get_logger(__name__)

# A conversation every template accepts (user/assistant alternating, no system turn: Mistral's
# template refuses one), used to check a template once before the data is tokenized.
PROBE = [{"role": "user", "content": "Say owl."}, {"role": "assistant", "content": "owl"},
         {"role": "user", "content": "Say hat."}, {"role": "assistant", "content": "hat"}]
_FIX_SPLIT = ("set data.chat_template to a template that renders each message the same whether or not later "
              "messages follow (and supports add_generation_prompt), or data.train_on_prompt: true")


class TemplateSplitError(UserError):
    """The template renders a conversation so that assistant turns cannot be told apart by prefixes."""


class TemplateRefusal(UserError):
    """The template raised for a conversation (roles it does not accept, alternation)."""


def install_template(tokenizer, chat_template: str | None) -> None:
    """Put data.chat_template (inline Jinja or a .jinja path) on the tokenizer, so the saved artifact renders
    chats as training did; refuse a tokenizer without any template."""
    if chat_template:
        # As the schema reads it: Jinja ({ or a newline) is the template text, anything else a .jinja path.
        is_text = "{" in chat_template or "\n" in chat_template
        tokenizer.chat_template = chat_template if is_text else Path(chat_template).expanduser().read_text()
    if not tokenizer.chat_template:
        raise UserError("chat data needs a chat template, and the tokenizer has none",
                        "set data.chat_template (inline Jinja or a .jinja file)")


def role_problem(messages: list[dict]) -> str:
    """'' for a conversation whose turns are in an order every chat template accepts, else what is wrong."""
    seen_other = False
    for j, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            if seen_other:
                return f"message {j} is a system turn after the conversation started (system turns come first)"
            continue
        if not seen_other and role != "user":
            return (f"message {j} has role {role!r} before any user turn (a conversation starts with a user turn, "
                    "after an optional system turn)")
        seen_other = True
    return ""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    from jinja2.exceptions import SecurityError, TemplateError

    try:  # bounded in time and size (a template may come from a downloaded model or GGUF: bounds.py)
        return bounds.render_template(lambda: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt))
    except SecurityError as e:  # the template itself reached for Python internals: not the rows' fault
        raise UserError(f"the chat template tried something Jinja's sandbox forbids ({e})",
                        "do not use this template (a chat template never needs Python internals); set "
                        "data.chat_template to a plain one") from None
    except TemplateError as e:  # raise_exception(...) in the template: roles it refuses, alternation
        roles = [m["role"] for m in messages]
        raise TemplateRefusal(f"the chat template refuses a conversation: {e} (roles: {roles})",
                              "fix or remove those rows, or set data.chat_template to a template that accepts "
                              "these roles") from None


def special_tokens(tokenizer) -> list[str]:
    """The strings of the tokenizer's special tokens (where an end-of-turn token is looked for)."""
    found = set(tokenizer.all_special_tokens)
    found.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in found if t), key=len, reverse=True)


def _special_run_end(text: str, start: int, end: int, specials: list[str]) -> int | None:
    """End offset of the first run of adjacent special tokens inside text[start:end] (`<|im_end|>`, or
    Command R's `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`), or None if there is none."""
    first = None
    for s in specials:  # longest first
        k = text.find(s, start, end)
        if k >= 0 and (first is None or k < first):
            first = k
    if first is None:
        return None
    pos = first
    while True:
        nxt = next((s for s in specials if text.startswith(s, pos) and pos + len(s) <= end), None)
        if nxt is None:
            return pos
        pos += len(nxt)


def _shared_end(through: str, full: str, specials: list[str]) -> int:
    """How much of `through` (the conversation ending at an assistant message) `full` renders the same, or -1.

    A template may close the whole conversation with special tokens after its last message (Phi-3
    appends EOS): `through` then ends with that closing text, which `full` has only at its very end.
    """
    cut = len(through)
    while True:
        if full.startswith(through[:cut]) and full.endswith(through[cut:]):
            return cut
        body = through[:cut]
        if body and body[-1].isspace():
            cut -= 1
            continue
        peeled = next((s for s in specials if body.endswith(s)), None)
        if peeled is None:
            return -1
        cut -= len(peeled)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character span of every assistant turn: its text through its end-of-turn token)."""
    full = _render(tokenizer, messages)
    specials = special_tokens(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise UserError("a conversation starts with an assistant turn: there is no context to learn it from",
                            "start each conversation with a user turn (after an optional system turn)")
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1])
        if not through.startswith(before):
            raise TemplateSplitError(
                f"the chat template renders the conversation before assistant message {i} with its generation prompt "
                f"as ...{before[-60:]!r}, and the conversation including that message as "
                f"...{through[max(len(before) - 60, 0):len(before) + 20]!r}: the assistant tokens cannot be found "
                "(templates whose generation prompt opens a reasoning block that history drops do this)", _FIX_SPLIT)
        end = _shared_end(through, full, specials)
        if end < 0:
            raise TemplateSplitError(
                f"the chat template renders assistant message {i} differently when later messages follow "
                f"(...{through[-60:]!r} alone): the assistant tokens cannot be found (templates that drop earlier "
                "reasoning from the history do this)", _FIX_SPLIT)
        # The end-of-turn token(s): the first run of special tokens after the message's content (after the
        # generation prompt if the template rewrites the content). Generation stops there.
        content = m["content"].strip()
        k = full.rfind(content, len(before), end) if content else -1
        stop = _special_run_end(full, k + len(content) if k >= 0 else len(before), end, specials)
        if stop is None:
            last = f", and as the last message it ends with {through[end:]!r}" if end < len(through) else ""
            raise UserError(
                f"the chat template ends assistant turns without a special end-of-turn token of their own (assistant "
                f"message {i} renders as {full[len(before):end]!r}{last}): the model would never learn to stop",
                "set data.chat_template to a template that ends each assistant turn with eos_token (or the model's "
                "end-of-turn token)")
        spans.append((len(before), stop))
    return full, spans


def _mask(offsets, spans) -> list[int]:
    """1 for every token overlapping a span (transformers' rule for `{% generation %}` spans)."""
    mask, k = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = 1
    return mask


def tokenize(tokenizer, messages: list[dict], only_assistant: bool = True) -> dict:
    """input_ids (the template rendered and tokenized as `apply_chat_template(tokenize=True)` does) and
    assistant_masks (1 on assistant turns through their end-of-turn token; all ones if not only_assistant)."""
    if not only_assistant:
        ids = tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    text, spans = assistant_spans(tokenizer, messages)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise UserError(f"assistant-only loss needs token offsets, and {type(tokenizer).__name__} has none",
                        "use the model's fast tokenizer (tokenizer.json), or data.train_on_prompt: true") from None
    return {"input_ids": enc["input_ids"], "assistant_masks": _mask(enc["offset_mapping"], spans)}


# Bump when the masking rule changes: `datasets` caches map results by the function's arguments, and
# would otherwise reuse masks made by an older rule.
RULE_VERSION = 1


def _tokenize_row(row, tokenizer, only_assistant, rule):
    return tokenize(tokenizer, row["messages"], only_assistant)


def tokenize_dataset(ds, tokenizer, only_assistant: bool):
    """Add input_ids + assistant_masks to a dataset of `messages` rows (TRL builds labels from them)."""
    return ds.map(_tokenize_row, fn_kwargs={"tokenizer": tokenizer, "only_assistant": only_assistant,
                                            "rule": RULE_VERSION}, desc="tokenizing chats")


def _probe(tokenizer, sample: list[dict] | None, fn):
    """fn(PROBE), or fn(sample) where the template refuses the probe (a template that wants a system turn)."""
    try:
        return fn(PROBE)
    except TemplateRefusal:
        if sample is None:
            raise
        return fn(sample)


def check_template(tokenizer, only_assistant: bool = True, sample: list[dict] | None = None) -> None:
    """Split a probe conversation (or `sample`, a conversation of the data) once, so that a template that
    cannot be split fails before the data is tokenized; log what an assistant turn supervises, and where the
    template's own {% generation %} markers (if any) would supervise something else."""
    import re

    if not only_assistant:
        return
    conversation = _probe(tokenizer, sample, lambda c: (tokenize(tokenizer, c), c))
    ids, mask = conversation[0]["input_ids"], conversation[0]["assistant_masks"]
    supervised = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    log.info("data: assistant-only loss, spans derived from the chat template: in %r the supervised tokens are %r",
             tokenizer.decode(ids)[-300:], supervised[-200:])
    if re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template):
        marked = bounds.render_template(lambda: tokenizer.apply_chat_template(
            conversation[1], tokenize=True, return_dict=True, return_assistant_tokens_mask=True))
        if list(marked["assistant_masks"]) != mask:
            log.warning("data: the chat template's {%% generation %%} markers would supervise %r; training "
                        "supervises %r (each answer through its end-of-turn token, docs/data.md)",
                        tokenizer.decode([t for t, m in zip(marked["input_ids"], marked["assistant_masks"]) if m]),
                        supervised)


def stop_token_ids(tokenizer, sample: list[dict] | None = None) -> list[int]:
    """Token ids generation stops at: the template's end-of-turn token(s), then EOS."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return eos
    try:
        text, spans = _probe(tokenizer, sample, lambda c: assistant_spans(tokenizer, c))
    except UserError:  # a template that cannot be split: training refused it already; stop at EOS
        return eos
    if not spans:
        return eos
    special = set(tokenizer.convert_tokens_to_ids(special_tokens(tokenizer)))
    run = []
    for t in reversed(tokenizer(text[:spans[0][1]], add_special_tokens=False)["input_ids"]):
        if t not in special:
            break
        run.insert(0, t)
    return run + [t for t in eos if t not in run]
