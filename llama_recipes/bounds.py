"""Limits on files from elsewhere: recipes (YAML), chat templates (Jinja), GGUF metadata.

A recipe, a chat template or a GGUF file may come from someone else. Each is already parsed
safely (yaml safe loading, Jinja's sandbox, no pickles); this module bounds what parsing them may
cost, and checks a file against its own metadata before anything is built from it:

    YAML       at most YAML_MAX_NODES values once aliases are expanded (an alias bomb is a few lines
               that expand to billions), at most YAML_MAX_DEPTH levels of nesting
    templates  one render of one conversation: at most TEMPLATE_SECONDS seconds and
               TEMPLATE_MAX_CHARS characters; `{% include %}`/`{% import %}` (no loader) and
               running out of memory are errors naming the template, not tracebacks
    GGUF       layer, head and width counts inside sane ranges that divide as the architecture
               needs, before transformers builds a model of that shape

Each violation is a UserError (RecipeError for recipes) naming the file and the limit.
"""
import signal
import threading
import time
from contextlib import contextmanager

import yaml

from llama_recipes.errors import RecipeError, UserError

YAML_MAX_NODES = 100_000  # a real recipe has a few hundred
YAML_MAX_DEPTH = 64       # a real recipe nests 4 levels (section, key, list, mapping)


# -- YAML ------------------------------------------------------------------------------------------

def check_yaml_node(node, what: str = "the recipe") -> None:
    """Refuse a composed YAML document that expands to too many values or nests too deeply.

    Sizes are counted per node object with a memo, so an alias bomb (each level naming the previous
    one ten times) is measured in time linear in its text, never expanded.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack = [(node, False)]
    while stack:  # iterative post-order: a document nested 10,000 levels must not exhaust Python's stack
        n, done = stack.pop()
        if id(n) in size:
            continue
        children = _children(n)
        if not done:
            stack.append((n, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        size[id(n)] = min(1 + sum(size.get(id(c), 1) for c in children), 10**12)
        depth[id(n)] = 1 + max((depth.get(id(c), 1) for c in children), default=0)
        if depth[id(n)] > YAML_MAX_DEPTH:
            raise RecipeError(f"{what} nests more than {YAML_MAX_DEPTH} levels deep",
                              "a recipe is a few sections of keys: remove the nesting")
        if size[id(n)] > YAML_MAX_NODES:
            raise RecipeError(f"{what} expands to more than {YAML_MAX_NODES:,} values once its YAML aliases "
                              "(*name) are expanded (an alias bomb?)",
                              "write the values out, or use fewer aliases; a recipe holds a few hundred values")


def _children(n) -> list:
    if isinstance(n, yaml.SequenceNode):
        return list(n.value)
    if isinstance(n, yaml.MappingNode):
        return [x for pair in n.value for x in pair]
    return []


class BoundedComposer:
    """Mixed into a yaml Loader: the composed document is checked (check_yaml_node) before it is built."""

    def get_single_node(self):
        try:
            node = super().get_single_node()
        except RecursionError:
            raise RecipeError(f"the YAML nests more than {YAML_MAX_DEPTH} levels deep (Python's recursion limit "
                              "was reached reading it)", "a recipe is a few sections of keys: remove the nesting") from None
        if node is not None:
            check_yaml_node(node, "the YAML")
        return node


class BoundedSafeLoader(BoundedComposer, yaml.SafeLoader):
    """yaml.SafeLoader with the bounds above (for recipe.yaml read back from a run directory)."""


def safe_load(text: str):
    return yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 (a SafeLoader subclass)


# -- chat templates ----------------------------------------------------------------------------------

TEMPLATE_SECONDS = 10.0           # one conversation renders in milliseconds
TEMPLATE_MAX_CHARS = 16 * 2**20   # 16 Mi characters: ~4M tokens, more than any context window


class _TemplateTimeout(BaseException):  # BaseException: the template's own error handling cannot swallow it
    pass


@contextmanager
def _deadline(seconds: float):
    """Interrupt the block after `seconds` (SIGALRM; only on the main thread, elsewhere checked after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise _TemplateTimeout()

    previous = signal.signal(signal.SIGALRM, fire)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:  # someone else's timer was running: give back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - started), 1e-3), old_interval)


def render_template(render, where: str = "the chat template"):
    """render() (one apply_chat_template call) within the time and size bounds; a UserError naming `where`.

    Jinja's TemplateError (raise_exception in the template) passes through for the caller to word.
    """
    from jinja2.exceptions import TemplateError

    fix = ("fix the chat template: a chat template renders each conversation once, in linear time "
           "(no nested loops over large ranges, no string repetition, no {% include %})")
    started = time.monotonic()
    try:
        with _deadline(TEMPLATE_SECONDS):
            out = render()
    except _TemplateTimeout:
        raise UserError(f"{where}: rendering one conversation took more than {TEMPLATE_SECONDS:g} s "
                        "(a loop that never ends, or a very long one)", fix) from None
    except MemoryError:
        raise UserError(f"{where}: rendering one conversation ran out of memory", fix) from None
    except (TemplateError, UserError):
        raise
    except (TypeError, ValueError, OverflowError, AttributeError, IndexError, KeyError, ZeroDivisionError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        hint = " ({% include %} and {% import %} are not available in chat templates)" \
            if "loader" in first.lower() else ""
        raise UserError(f"{where}: the template failed: {type(e).__name__}: {first}{hint}", fix) from None
    if time.monotonic() - started > TEMPLATE_SECONDS:  # off the main thread the deadline is not enforced
        raise UserError(f"{where}: rendering one conversation took more than {TEMPLATE_SECONDS:g} s", fix)
    size = len(out) if isinstance(out, str) else sum(len(x) for x in out) if isinstance(out, list) and \
        all(isinstance(x, str) for x in out) else 0
    if size > TEMPLATE_MAX_CHARS:
        raise UserError(f"{where}: one conversation rendered to {size:,} characters (the bound is "
                        f"{TEMPLATE_MAX_CHARS:,})", fix)
    return out


# -- GGUF metadata -------------------------------------------------------------------------------------

GGUF_BOUNDS = {  # config key -> (lowest, highest) a real model has; far wider than any published model
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 24),
    "max_position_embeddings": (1, 1 << 24),
}


def check_model_config(cfg, source) -> None:
    """A config read from a GGUF's metadata: counts in range, heads dividing the width (else a UserError)."""
    fix = "the file's metadata is damaged or not a model's: use an intact GGUF (llama.cpp's convert scripts write them)"
    values = {}
    for key, (lo, hi) in GGUF_BOUNDS.items():
        v = getattr(cfg, key, None)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise UserError(f"{source}: its metadata says {key} = {v!r}, outside {lo:,}..{hi:,}", fix)
        values[key] = v
    heads, kv, hidden = values.get("num_attention_heads"), values.get("num_key_value_heads"), values.get("hidden_size")
    head_dim = getattr(cfg, "head_dim", None)
    if heads and hidden and not head_dim and hidden % heads:
        raise UserError(f"{source}: its metadata says hidden_size {hidden} with {heads} attention heads, "
                        "which do not divide it", fix)
    if heads and kv and heads % kv:
        raise UserError(f"{source}: its metadata says {heads} attention heads and {kv} key/value heads, "
                        "which do not divide them", fix)


# GGUF metadata keys (after the architecture prefix, llama.block_count) -> bounds, as GGUF_BOUNDS
GGUF_KEYS = {"block_count": "num_hidden_layers", "attention.head_count": "num_attention_heads",
             "attention.head_count_kv": "num_key_value_heads", "embedding_length": "hidden_size",
             "feed_forward_length": "intermediate_size", "vocab_size": "vocab_size",
             "context_length": "max_position_embeddings"}
_PER_LAYER = {  # tensor name in a block -> its shape, fastest dimension first (GGUF order), from the metadata
    "attn_q.weight": lambda m: (m["hidden"], m["heads"] * m["head_dim"]),
    "attn_k.weight": lambda m: (m["hidden"], m["kv"] * m["head_dim"]),
    "attn_v.weight": lambda m: (m["hidden"], m["kv"] * m["head_dim"]),
    "attn_output.weight": lambda m: (m["heads"] * m["head_dim"], m["hidden"]),
    "ffn_gate.weight": lambda m: (m["hidden"], m["ffn"]),
    "ffn_up.weight": lambda m: (m["hidden"], m["ffn"]),
    "ffn_down.weight": lambda m: (m["ffn"], m["hidden"]),
    "attn_norm.weight": lambda m: (m["hidden"],),
    "ffn_norm.weight": lambda m: (m["hidden"],),
}


def check_gguf(path) -> None:
    """A GGUF's metadata within bounds (before transformers reads it), and its tensors of the shapes that
    metadata implies. Reads the header only (memory-mapped): no tensor data is touched."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # the caller reports the missing package
    fix = "the file is damaged or was written with the wrong metadata: use an intact GGUF (llama.cpp's convert scripts write them)"
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to parse the header is a damaged file
        raise UserError(f"cannot read the GGUF file {path}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}", fix) from None
    meta = {}
    for key, field in reader.fields.items():
        short = key.split(".", 1)[1] if "." in key else key
        if short not in GGUF_KEYS or not field.data:
            continue
        values = [int(v) for i in field.data for v in field.parts[i].reshape(-1)]
        lo, hi = GGUF_BOUNDS[GGUF_KEYS[short]]
        bad = [v for v in values if not lo <= v <= hi]
        if bad:
            raise UserError(f"{path}: its metadata says {key} = {bad[0]:,}, outside {lo:,}..{hi:,}", fix)
        meta[short] = values[0] if len(set(values)) == 1 else None  # per-layer values: not checked below
    heads, kv, hidden = meta.get("attention.head_count"), meta.get("attention.head_count_kv"), meta.get("embedding_length")
    key_length = next((int(f.parts[f.data[0]][0]) for k, f in reader.fields.items()
                       if k.endswith(".attention.key_length") and f.data), None)
    if heads and hidden and not key_length and hidden % heads:
        raise UserError(f"{path}: its metadata says embedding_length {hidden} with {heads} attention heads, "
                        "which do not divide it", fix)
    if heads and kv and heads % kv:
        raise UserError(f"{path}: its metadata says {heads} attention heads and {kv} key/value heads, which do "
                        "not divide them", fix)
    m = {"hidden": hidden, "heads": heads, "kv": kv or heads, "ffn": meta.get("feed_forward_length"),
         "head_dim": key_length or (hidden // heads if hidden and heads else None)}
    layers = set()
    for t in reader.tensors:
        shape = tuple(int(x) for x in t.shape)
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
            layers.add(int(parts[1]))
            rule = _PER_LAYER.get(".".join(parts[2:]))
        elif t.name == "token_embd.weight":
            rule = lambda m: (m["hidden"], meta.get("vocab_size") or shape[-1])  # noqa: E731
        else:
            rule = None
        try:
            want = rule(m) if rule else None
        except TypeError:  # a value the rule needs is not in the metadata
            want = None
        if want and shape != want:
            raise UserError(f"{path}: tensor {t.name} has shape {list(shape)}; the file's metadata implies {list(want)}", fix)
    n = meta.get("block_count")
    if n and layers and layers != set(range(n)):
        raise UserError(f"{path}: its metadata says {n} layers, its tensors hold {len(layers)} "
                        f"(blk.{min(layers)}..blk.{max(layers)})", fix)
