"""Apply the recipe's `freeze:` rules, rank layers by weight SNR, and report what trains.

Freezing is per parameter (`requires_grad`), never per module wrapper, so it survives PEFT
wrapping and FSDP2 (which shards each parameter and handles mixed `requires_grad` in a unit;
FSDP1 needs `use_orig_params=True` for that, pytorch#104690).
"""
import json
import math
import re
from pathlib import Path

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger, is_main_process

log = get_logger(__name__)

REPORT_FILE = "trainable_parameters.json"
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
KINDS = {
    "attention": re.compile(r"(?:^|\.)(?:self_attn|attention|attn)\."),
    "mlp": re.compile(r"(?:^|\.)(?:mlp|feed_forward)\."),
    "norms": re.compile(r"norm[^.]*\.(?:weight|bias)$"),
    "embeddings": re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_positions|word_embeddings)\."),
    "lm_head": re.compile(r"(?:^|\.)lm_head\."),
}
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|score|classifier|head)\.")
SELECTION_ATTR = "_llama_recipes_selection"


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def num_layers(model, names: list[str]) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    found = [i for i in map(layer_of, names) if i is not None]
    return max(found) + 1 if found else 0


def _describe(rule) -> str:
    return ", ".join(f"{k}: {v}" for k, v in rule.model_dump(exclude_defaults=True).items())


def rule_matches(rule, names: list[str], n_layers: int, where: str) -> set[str]:
    """Parameter names selected by one rule; a selector that matches nothing is a UserError naming `where`."""
    def none(key, what, fix):
        raise UserError(f"{where}.{key}: {what} matches no parameter", fix)

    example = f"check against parameter names such as {names[0]!r}" if names else "the model has no parameters"
    selected = set(names)
    if rule.patterns:
        for rx in rule.patterns:
            if not any(re.search(rx, n) for n in names):
                none("patterns", repr(rx), example)
        selected &= {n for n in names if any(re.search(rx, n) for rx in rule.patterns)}
    layers = rule.layer_indices(n_layers)
    if layers is not None:
        bad = sorted(i for i in layers if not 0 <= i < n_layers)
        if bad:
            raise UserError(f"{where}: layer(s) {bad} out of range", f"the model has {n_layers} decoder layers: 0-{n_layers - 1}")
        selected &= {n for n in names if layer_of(n) in layers}
    if rule.modules:
        for kind in rule.modules:
            if not any(KINDS[kind].search(n) for n in names):
                fix = ("the input embeddings are tied to lm_head here: select `embeddings` instead" if kind == "lm_head"
                       else f"this model has no {kind} parameters by that name; use patterns: with a regex ({example})")
                none("modules", repr(kind), fix)
        selected &= {n for n in names if any(KINDS[k].search(n) for k in rule.modules)}
    if rule.exclude:
        for rx in rule.exclude:
            if not any(re.search(rx, n) for n in names):
                none("exclude", repr(rx), example)
        selected -= {n for n in names if any(re.search(rx, n) for rx in rule.exclude)}
    if not selected:
        raise UserError(f"{where} ({_describe(rule)}) matches no parameter: its selectors exclude each other",
                        "loosen the rule (selectors in one rule must all hold; list separate rules to add them up)")
    return selected


def apply_freeze(model, cfg) -> dict | None:
    """Apply `freeze:`. `train`/`select`: only what they pick trains. `freeze`: frozen last (wins).

    Returns the data-driven selection (also kept on the model for the artifact report), or None.
    A rule that matches nothing is an error: a silent no-op is the classic freezing bug.
    """
    if not cfg.active:
        return None
    params = dict(model.named_parameters())
    names = list(params)
    n_layers = num_layers(model, names)
    train = set().union(*[rule_matches(r, names, n_layers, f"freeze.train[{i}]") for i, r in enumerate(cfg.train)])
    frozen = set().union(*[rule_matches(r, names, n_layers, f"freeze.freeze[{i}]") for i, r in enumerate(cfg.freeze)])
    selection = None
    if cfg.select:
        selection = select_by_snr(model, cfg.select, n_layers)
        train |= set(selection["parameters"])
    if cfg.train or cfg.select:
        for n, p in params.items():
            p.requires_grad_(n in train)
    for n in frozen:
        params[n].requires_grad_(False)
    if not any(p.requires_grad for p in params.values()):
        raise UserError("the freeze: rules leave no parameter trainable", "check freeze.train / freeze.freeze")
    if selection is not None:
        selection = {k: v for k, v in selection.items() if k != "parameters"}
        model.__dict__[SELECTION_ATTR] = selection  # plain attribute, not a submodule/buffer
    return selection


# -- data-driven selection: Spectrum-style signal-to-noise ratio of the weights ------------------

def weight_snr(weight) -> float:
    """Spectrum's SNR (Hartford et al. 2024): singular values above the Marchenko-Pastur edge
    (noise scale from the IQR of the spectrum) over those below, divided by the largest one."""
    import torch

    s = torch.linalg.svdvals(weight.detach().float())
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = weight.shape[-2:]
    beta = min(n, m) / max(n, m)
    threshold = sigma * (1 + math.sqrt(beta))
    signal, noise = s[s > threshold].sum(), s[s <= threshold].sum()
    snr = (signal / noise).item() if noise > 0 else float("inf")
    return snr / s[0].item()


def select_by_snr(model, cfg, n_layers: int) -> dict:
    """Rank decoder layers (mean SNR of their matrices) or each linear within its kind; keep the top fraction."""
    matrices = {n: p for n, p in model.named_parameters()
                if p.ndim == 2 and n.endswith(".weight") and layer_of(n) is not None and "lora_" not in n}
    if not matrices:
        raise UserError("freeze.select: the model has no weight matrices inside numbered decoder layers",
                        "use freeze.train rules instead")
    scores = {n: weight_snr(p) for n, p in matrices.items()}
    all_names = [n for n, _ in model.named_parameters()]
    if cfg.unit == "layers":
        per_layer: dict[int, list[float]] = {}
        for n, s in scores.items():
            per_layer.setdefault(layer_of(n), []).append(s)
        unit_scores = {f"layers.{i}": sum(v) / len(v) for i, v in sorted(per_layer.items())}
        k = max(1, math.ceil(cfg.fraction * len(unit_scores)))
        chosen = sorted(unit_scores, key=unit_scores.get, reverse=True)[:k]
        idx = {int(c.split(".")[1]) for c in chosen}
        parameters = [n for n in all_names if layer_of(n) in idx]
    else:
        unit_scores = {n.removesuffix(".weight"): s for n, s in scores.items()}
        kinds: dict[str, list[str]] = {}
        for u in unit_scores:
            kinds.setdefault(u.rsplit(".", 1)[-1], []).append(u)
        chosen = []
        for members in kinds.values():
            k = max(1, math.ceil(cfg.fraction * len(members)))
            chosen += sorted(members, key=unit_scores.get, reverse=True)[:k]
        parameters = [n for n in all_names if any(n.startswith(c + ".") for c in chosen)]
    chosen = sorted(chosen, key=lambda u: (layer_of(u + ".") or 0, u))
    log.info("freeze.select: training the top %s of %s by %s: %s", cfg.fraction, cfg.unit, cfg.by, ", ".join(chosen))
    return {"by": cfg.by, "unit": cfg.unit, "fraction": cfg.fraction, "selected": chosen,
            "scores": {u: round(s, 6) for u, s in unit_scores.items()}, "parameters": parameters}


# -- the per-group summary ---------------------------------------------------------------------

def group_of(name: str) -> str:
    i = layer_of(name)
    if i is not None:
        return f"layers.{i}"
    if KINDS["embeddings"].search(name):
        return "embeddings"
    if _HEAD.search(name):
        return "head"
    if KINDS["norms"].search(name):
        return "norm"
    return "other"


def report(model) -> dict:
    """Trainable/total parameters per group (embeddings, each layer, norm, head), logged as a table."""
    groups: dict[str, list[int]] = {}
    for n, p in model.named_parameters():  # named_parameters() lists a tied tensor once
        g = groups.setdefault(group_of(n), [0, 0])
        g[1] += p.numel()
        g[0] += p.numel() if p.requires_grad else 0
    rank = {"embeddings": 0, "norm": 2, "head": 3, "other": 4}
    order = lambda g: (1, int(g.split(".")[1])) if g.startswith("layers.") else (rank[g], 0)
    rows = [{"group": g, "trainable": groups[g][0], "total": groups[g][1]} for g in sorted(groups, key=order)]
    out = {"groups": rows, "trainable": sum(r["trainable"] for r in rows), "total": sum(r["total"] for r in rows)}
    selection = model.__dict__.get(SELECTION_ATTR)
    if selection is not None:
        out["selection"] = selection
    log.info("trainable parameters per group:\n%s", format_table(out))
    return out


def format_table(rep: dict) -> str:
    lines = ["| group | trainable | total | trainable % |", "|---|---:|---:|---:|"]
    for r in [*rep["groups"], {"group": "**all**", "trainable": rep["trainable"], "total": rep["total"]}]:
        pct = 100 * r["trainable"] / r["total"] if r["total"] else 0.0
        lines.append(f"| {r['group']} | {r['trainable']:,} | {r['total']:,} | {pct:.2f} |")
    return "\n".join(lines)


def save_report(out: Path, rep: dict) -> None:
    """OUTPUT_DIR/trainable_parameters.json: the per-group table and the data-driven selection."""
    if is_main_process():
        (Path(out) / REPORT_FILE).write_text(json.dumps(rep, indent=2) + "\n")
