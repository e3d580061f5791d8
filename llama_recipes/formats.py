"""The data-format registry: one object per `data.format`, the one place behaviour differs by format.

    fmt = formats.get(name)                    # or formats.detect(columns) for `format: auto`
    fmt.required, fmt.optional                 canonical columns (data.columns maps the user's onto them)
    fmt.problem(row, label_ids)                what is wrong with one row, '' for a good one (data.check_rows)
    fmt.render(ds, template, ...)              checked rows -> the columns the objective's trainer consumes
    fmt.prompt(template, tokenizer)            a user's text as training rendered prompts (`adapters --prompt`)

The names come from here: the schema's `data.format` choices (schema/data.py), the order `format:
auto` tries them in (DETECTION), and the formats each objective trains on (schema/objective.py checks
its `formats` against REGISTRY). Loading files, label sets, mixing and lengths stay in data.py, which
asks these objects and never branches on a name. Imports nothing heavy (the schema imports this
module): `datasets` only inside the renderers. Adding a format: a subclass of Format here, one entry
in REGISTRY and its place in DETECTION (docs/architecture.md).
"""
from __future__ import annotations

import string

from llama_recipes.chat import role_problem
from llama_recipes.errors import UserError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SUMMARY_PROMPT = "Summarize this dialogue:\n{document}\n---\nSummary:\n"
ROLES = {"system", "user", "assistant", "tool"}


class Format:
    """Behaviour of one `data.format`. Subclasses override what differs."""

    name: str = ""
    required: tuple[str, ...] = ()  # columns that must be there and non-empty (text, unless `problem` says otherwise)
    optional: tuple[str, ...] = ()  # columns that may be missing or null
    identified_by: frozenset[str] = frozenset()  # columns that make `format: auto` read it (tried in DETECTION order)
    family: str = ""  # the format whose shape it renders to: formats of one family can be mixed (data.mix)
    rendered: frozenset[str] = frozenset()  # a family's: the columns that mark its rendered (or tokenized) rows
    aliases: dict[str, tuple[str, ...]] = {}  # canonical column -> columns read as it when it is missing
    completion_only: bool = False  # prompt + completion rows: TRL supervises the completion only (completion_only_loss)
    chat: bool = False  # conversations: the chat template renders them, chat.py tokenizes them (assistant masks)
    labels: bool = False  # a class label per row, from a label set (data.label_set; head methods)
    takes_input: bool = False  # `llama-recipes adapters --input` fills its `input` field

    def __repr__(self) -> str:
        return f"<format {self.name}>"

    # -- reading rows -------------------------------------------------------------------------------
    def renames(self, columns: list[str]) -> dict[str, str]:
        """{their column: canonical} for the aliases found in `columns` (taken only when every other
        required column is there: a `dialogue` is a summarization's document only next to a `summary`)."""
        out = {}
        for col, names in self.aliases.items():
            others = [c for c in self.required if c != col]
            if col not in columns and all(c in columns for c in others):
                alias = next((a for a in names if a in columns), None)
                if alias:
                    out[alias] = col
        return out

    def problem(self, row: dict, label_ids: dict | None = None) -> str:
        """'' for a good row, else 'column `X`: what is wrong'."""
        for col in self.required + self.optional:
            problem = self.column_problem(col, row.get(col), label_ids)
            if problem:
                return problem
        return ""

    def column_problem(self, col: str, value, label_ids: dict | None) -> str:
        """A text column: a string, and not blank where required."""
        if value is None:
            return f"column `{col}`: missing value" if col in self.required else ""
        if not isinstance(value, str):
            return f"column `{col}`: expected a string, got {type(value).__name__}"
        if col in self.required and not value.strip():
            return f"column `{col}`: empty"
        return ""

    # -- training -----------------------------------------------------------------------------------
    def render(self, ds, template: str | None, label_names: list[str] | None = None,
               label_ids: dict | None = None):
        """Checked rows -> the columns SFTTrainer (or the objective's trainer, or a head) consumes."""
        raise NotImplementedError

    def lm_text(self, row: dict) -> str:
        """The text of a rendered row that TRL tokenizes as one sequence (data._lengths)."""
        return row["text"]

    # -- inference ----------------------------------------------------------------------------------
    def prompt(self, template: str | None, tokenizer):
        """(render(text, input=''), add_special_tokens): a user's text as training rendered its prompts,
        with the run's prompt_template; None: the text as given."""
        return None


# -- prompt / completion ------------------------------------------------------------------------------


class PromptCompletion(Format):
    """prompt?/completion; a prompt_template builds the prompt from the row's columns."""

    name = "prompt_completion"
    required, optional = ("completion",), ("prompt",)
    identified_by = frozenset({"prompt", "completion"})
    family = "prompt_completion"
    rendered = frozenset({"prompt", "completion"})
    completion_only = True

    def render(self, ds, template, label_names=None, label_ids=None):
        cols = ds.column_names
        if template:
            _template_fields_ok(template, cols, self.name)
            return ds.map(lambda r: {"prompt": template.format(**r), "completion": r["completion"]},
                          remove_columns=cols, desc="rendering prompts")
        if "prompt" not in cols:
            ds = ds.add_column("prompt", [""] * len(ds))
        return ds.map(lambda r: {"prompt": r["prompt"] or ""}, desc="rendering prompts").select_columns(
            ["prompt", "completion"])

    def lm_text(self, row):
        return row["prompt"] + row["completion"]

    def prompt(self, template, tokenizer):
        fields = _fields(template)
        if template and len(set(fields)) == 1:  # the user's text is that one field
            return (lambda t, i="": template.format(**{fields[0]: t})), True
        return None


class Alpaca(PromptCompletion):
    """instruction/input?/output in the Alpaca template (or the recipe's prompt_template)."""

    name = "alpaca"
    required, optional = ("instruction", "output"), ("input",)
    identified_by = frozenset({"instruction", "output"})
    takes_input = True

    def render(self, ds, template, label_names=None, label_ids=None):
        cols = ds.column_names
        _template_fields_ok(template, cols, self.name)
        return ds.map(lambda r: render_alpaca(r, template), remove_columns=cols, desc="rendering alpaca")

    def prompt(self, template, tokenizer):
        fields = _fields(template)  # other columns a custom template names are left empty
        return (lambda t, i="": render_alpaca({**dict.fromkeys(fields, ""), "instruction": t, "input": i,
                                               "output": ""}, template)["prompt"]), True


class Summarization(PromptCompletion):
    """document/summary in 'Summarize this dialogue:' (or the recipe's prompt_template)."""

    name = "summarization"
    required, optional = ("document", "summary"), ()
    identified_by = frozenset({"document", "summary"})
    aliases = {"document": ("dialogue", "dialog", "article", "document")}

    def render(self, ds, template, label_names=None, label_ids=None):
        cols = ds.column_names
        _template_fields_ok(template, cols, self.name)
        template = template or SUMMARY_PROMPT
        return ds.map(lambda r: {"prompt": template.format(**r), "completion": r["summary"]},
                      remove_columns=cols, desc="rendering summarization")

    def prompt(self, template, tokenizer):
        fields = _fields(template)
        return (lambda t, i="": (template or SUMMARY_PROMPT).format(
            **{**dict.fromkeys(fields, ""), "document": t})), True


def render_alpaca(row: dict, template: str | None = None) -> dict:
    has_input = bool((row.get("input") or "").strip())
    fields = {**row, "input": row.get("input") or ""}
    prompt = (template or (ALPACA_PROMPT if has_input else ALPACA_PROMPT_NO_INPUT)).format(**fields)
    return {"prompt": prompt, "completion": row["output"]}


def _fields(template: str | None) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f] if template else []


def _template_fields_ok(template: str | None, columns: list[str], what: str):
    if not template:
        return
    unknown = sorted(set(_fields(template)) - set(columns))
    if unknown:
        raise UserError(f"data.prompt_template uses {unknown}, not columns of the {what} data ({columns})",
                        "use {column} fields that exist after data.columns mapping")


# -- chat, text, classification -------------------------------------------------------------------------


class Chat(Format):
    """messages: a list of {role, content} with at least one non-empty assistant turn."""

    name = "chat"
    required = ("messages",)
    identified_by = frozenset({"messages"})
    family = "chat"
    rendered = frozenset({"messages"})
    chat = True

    def column_problem(self, col, value, label_ids):
        problem = _messages_problem(value, col)
        if problem:
            return problem
        order = role_problem(value)
        return f"column `messages`: {order}" if order else ""

    def render(self, ds, template, label_names=None, label_ids=None):
        # Keep role/content only: hub datasets carry extra per-message keys that templates choke on.
        return ds.map(lambda r: {"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]},
                      remove_columns=ds.column_names, desc="rendering chat")

    def prompt(self, template, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            return None
        # one user turn; the template adds BOS itself (as in measure.generation_pairs)
        return (lambda t, i="": tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                              add_generation_prompt=True)), False


class Text(Format):
    """text: plain language modelling."""

    name = "text"
    required = ("text",)
    identified_by = frozenset({"text"})
    family = "text"
    rendered = frozenset()  # rows that are no other family's are plain text

    def render(self, ds, template, label_names=None, label_ids=None):
        return ds.select_columns(["text"])


class Classification(Format):
    """text/label: a label (name or id) from the label set, for head methods."""

    name = "classification"
    required = ("text", "label")
    identified_by = frozenset({"text", "label"})
    family = "classification"
    rendered = frozenset({"label"})  # a head's tokenized rows keep the label, not the text
    labels = True

    def column_problem(self, col, value, label_ids):
        if col != "label":
            return super().column_problem(col, value, label_ids)
        if value is None:
            return "column `label`: missing value"
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return f"column `label`: expected a string or an integer, got {type(value).__name__}"
        if label_ids is not None and value not in label_ids:
            return f"column `label`: {value!r} is not in the label set {sorted(label_ids, key=str)}"
        return ""

    def render(self, ds, template, label_names=None, label_ids=None):
        import datasets

        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=label_names)})
        return ds.map(lambda r: {"text": r["text"], "label": label_ids[r["label"]]}, remove_columns=ds.column_names,
                      features=features, desc="rendering classification")


# -- preference and prompt-only data (text or message lists) ----------------------------------------------


class Preference(Format):
    """prompt?/chosen/rejected (a conversation's prompt may be implicit: the turns before the answer)."""

    name = "preference"
    required, optional = ("chosen", "rejected"), ("prompt",)  # text or message lists
    identified_by = frozenset({"chosen", "rejected"})
    family = "preference"
    rendered = frozenset({"chosen", "rejected"})

    def problem(self, row, label_ids=None):
        problem = _sides_problem(row, ("chosen", "rejected"))
        if problem:
            return problem
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if chosen == rejected:
            return "chosen and rejected are the same: there is nothing to prefer"
        if isinstance(chosen, list) and prompt is None:  # implicit prompt: the turns before the last answer
            if chosen[:-1] != rejected[:-1]:
                return ("chosen and rejected conversations differ before their last message (an implicit prompt "
                        "must be the same in both)")
            if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
                return "chosen and rejected conversations must end with the assistant's answer"
            if len(chosen) < 2:
                return "chosen and rejected hold only the answer: add the user turn (or a `prompt` column)"
        return ""

    def render(self, ds, template, label_names=None, label_ids=None):
        return ds.map(_render_preference, remove_columns=ds.column_names, desc="rendering preference pairs")


class UnpairedPreference(Format):
    """prompt?/completion/label (true: desirable), for KTO."""

    name = "unpaired_preference"
    required, optional = ("completion", "label"), ("prompt",)
    identified_by = frozenset({"completion", "label"})
    family = "unpaired_preference"
    rendered = frozenset({"completion", "label"})

    def problem(self, row, label_ids=None):
        problem = _sides_problem(row, ("completion",))
        if problem:
            return problem
        if not isinstance(row.get("label"), bool):
            return f"column `label`: expected true (desirable) or false (undesirable), got {row.get('label')!r}"
        return ""

    def render(self, ds, template, label_names=None, label_ids=None):
        return ds.map(lambda r: {"prompt": r.get("prompt") or ("" if isinstance(r["completion"], str) else []),
                                 "completion": _clean(r["completion"]), "label": r["label"]},
                      remove_columns=ds.column_names, desc="rendering unpaired preferences")


class PromptOnly(Format):
    """prompt: text, or messages ending with a turn to answer; every other column is kept for the rewards (GRPO)."""

    name = "prompt_only"
    required = ("prompt",)
    identified_by = frozenset({"prompt"})
    family = "prompt_only"
    rendered = frozenset({"prompt"})

    def problem(self, row, label_ids=None):
        prompt = row.get("prompt")
        if prompt is None:
            return "column `prompt`: missing value"
        if isinstance(prompt, str):
            return "" if prompt.strip() else "column `prompt`: empty"
        if isinstance(prompt, list):
            problem = _messages_problem(prompt, "prompt", need_assistant=False)
            if not problem and prompt[-1]["role"] == "assistant":
                return ("column `prompt`: the conversation ends with an assistant turn; the model answers the last "
                        "user turn")
            return problem
        return f"column `prompt`: expected text or a list of messages, got {type(prompt).__name__}"

    def render(self, ds, template, label_names=None, label_ids=None):
        # extra columns (answer, tests, ...) stay: rewards read them
        return ds.map(lambda r: {"prompt": _clean(r["prompt"])}, desc="rendering prompts")


def _messages_problem(value, col: str, need_assistant: bool = True) -> str:
    if not isinstance(value, list) or not value:
        return f"column `{col}`: empty or not a list of {{role, content}} messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"column `{col}`: message {j} has no string `content`"
        if m.get("role") not in ROLES:
            return f"column `{col}`: message {j} has unknown role {m.get('role')!r} (known: {sorted(ROLES)})"
    if need_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        return f"column `{col}`: no non-empty assistant message to learn from"
    return ""


def _side_problem(value, col: str) -> str:
    """A side of a preference (chosen, rejected, completion): non-empty text or messages."""
    if value is None:
        return f"column `{col}`: missing value"
    if isinstance(value, str):
        return "" if value.strip() else f"column `{col}`: empty"
    if isinstance(value, list):
        return _messages_problem(value, col)
    return f"column `{col}`: expected text or a list of messages, got {type(value).__name__}"


def _sides_problem(row: dict, sides: tuple[str, ...]) -> str:
    """Every side non-empty text or messages, an optional prompt of the same form (one form per row)."""
    for col in sides:
        problem = _side_problem(row.get(col), col)
        if problem:
            return problem
    kinds = {type(row[c]) for c in sides}
    prompt = row.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list):
            problem = _messages_problem(prompt, "prompt", need_assistant=False)
            if problem:
                return problem
        elif not isinstance(prompt, str):
            return f"column `prompt`: expected text or a list of messages, got {type(prompt).__name__}"
        kinds.add(type(prompt))
    if len(kinds) > 1:
        return "prompt and completions mix plain text and message lists: use one form for the whole row"
    return ""


def _clean(value):
    """Text as it is; messages reduced to role/content (hub sets carry extra per-message keys)."""
    return value if isinstance(value, str) else [{"role": m["role"], "content": m["content"]} for m in value]


def _render_preference(row: dict) -> dict:
    """TRL's explicit-prompt form: prompt, chosen, rejected (a conversation's implicit prompt split off)."""
    chosen, rejected, prompt = _clean(row["chosen"]), _clean(row["rejected"]), row.get("prompt")
    if prompt is None and isinstance(chosen, list):
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    elif prompt is None:
        prompt = ""
    return {"prompt": _clean(prompt), "chosen": chosen, "rejected": rejected}


# -- the registry ---------------------------------------------------------------------------------------

# In the order the schema and the messages list them.
REGISTRY: dict[str, Format] = {f.name: f for f in (
    Alpaca(), PromptCompletion(), Chat(), Text(), Summarization(), Classification(), Preference(),
    UnpairedPreference(), PromptOnly(),
)}
NAMES = tuple(REGISTRY)
# The order `format: auto` tries them in: the first whose `identified_by` columns are all there. Pairs before
# their parts (chosen/rejected before a lone prompt; prompt + completion before prompt alone).
DETECTION = ("preference", "unpaired_preference", "alpaca", "prompt_completion", "prompt_only", "chat",
             "summarization", "classification", "text")
if sorted(DETECTION) != sorted(NAMES):
    raise ImportError(f"format detection order {DETECTION} != formats {NAMES}")
if any(REGISTRY.get(f.family) is None or REGISTRY[f.family].family != f.family for f in REGISTRY.values()):
    raise ImportError("every format's family must be a format of that same family")
_families = [n for n in DETECTION if REGISTRY[n].family == n]
if REGISTRY[_families[-1]].rendered or not all(REGISTRY[n].rendered for n in _families[:-1]):
    raise ImportError("shape() needs every family's `rendered` columns, and none for the last one (rows of no other "
                      "family)")


def get(name: str) -> Format:
    return REGISTRY[name]


def in_families(*families: str) -> tuple[str, ...]:
    """The names of the formats that render to `families`, family by family (registry order within one)."""
    return tuple(n for fam in families for n, f in REGISTRY.items() if f.family == fam)


def detect(columns: list[str]) -> str:
    """The format `format: auto` reads `columns` as (after data.columns mapping)."""
    cols = set(columns)
    for name in DETECTION:
        if REGISTRY[name].identified_by <= cols:
            return name
    raise UserError(f"cannot detect the data format from columns {sorted(cols)}",
                    f"set data.format ({', '.join(NAMES)}) and data.columns if your column names differ")


def shape(columns: list[str]) -> Format:
    """The family of rendered (or tokenized) rows, from their columns: the first family in DETECTION order
    whose `rendered` columns are there (text, the last, marks none)."""
    cols = set(columns)
    return next(f for f in map(get, DETECTION) if f.family == f.name and f.rendered <= cols)
