"""`freeze:` section: which parameters of the model are trainable.

    freeze:
      train:                    # only these train; everything else is frozen
        - last_layers: 2        # one rule: its selectors must all hold (here: the last 2 decoder layers)
        - modules: [norms]      # a second rule: rules add up
      freeze:                   # then these are frozen (wins over `train`)
        - modules: [embeddings]
      select:                   # data-driven: also train the top fraction of layers by weight SNR
        by: snr
        fraction: 0.25

A plain string in `train`/`freeze` is a regex on parameter names (shorthand for `{patterns: [..]}`).
Every rule, and every selector inside it, must match at least one parameter.
"""
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llama_recipes.schema.base import Section

ModuleKind = Literal["attention", "mlp", "norms", "embeddings", "lm_head"]
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


class ParamRule(Section):
    """A set of parameters. Selectors given together must all hold (AND); omitted ones do not restrict."""

    patterns: list[str] = Field(default_factory=list, description="Regexes on parameter names; a name matching any is in.")
    exclude: list[str] = Field(default_factory=list, description="Regexes on parameter names taken out of this rule.")
    layers: list[int | str] = Field(
        default_factory=list, description="Decoder layer indices or inclusive ranges: [0, 3, '8-11']. Negative counts from the end."
    )
    first_layers: int | None = Field(None, gt=0, description="The first N decoder layers.")
    last_layers: int | None = Field(None, gt=0, description="The last N decoder layers.")
    modules: list[ModuleKind] = Field(
        default_factory=list, description="Module kinds: attention, mlp, norms, embeddings, lm_head."
    )

    @field_validator("patterns", "exclude")
    @classmethod
    def _regexes_compile(cls, v):
        for rx in v:
            try:
                re.compile(rx)
            except re.error as e:
                raise ValueError(f"invalid regex {rx!r}: {e}") from None
        return v

    @field_validator("layers")
    @classmethod
    def _layer_ranges(cls, v):
        for item in v:
            if isinstance(item, str):
                m = _RANGE.match(item)
                if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
                    raise ValueError(f"layer range {item!r} must look like '4-7' (inclusive, low-high)")
        return v

    @model_validator(mode="after")
    def _not_empty(self):
        if not (self.patterns or self.layers or self.first_layers or self.last_layers or self.modules):
            raise ValueError("a rule needs at least one of patterns, layers, first_layers, last_layers, modules")
        return self

    def layer_indices(self, n_layers: int) -> set[int] | None:
        """The decoder layers this rule restricts to, or None when it does not restrict by layer."""
        if not (self.layers or self.first_layers or self.last_layers):
            return None
        out: set[int] = set()
        for item in self.layers:
            if isinstance(item, int):
                out.add(item % n_layers if -n_layers <= item < 0 else item)
            else:
                lo, hi = _RANGE.match(item).groups()
                out.update(range(int(lo), int(hi or lo) + 1))
        if self.first_layers:
            out.update(range(min(self.first_layers, n_layers)))
        if self.last_layers:
            out.update(range(max(n_layers - self.last_layers, 0), n_layers))
        return out


def _rules(v):
    if v is None:
        return []
    if isinstance(v, (str, dict)):
        v = [v]
    return [{"patterns": [r]} if isinstance(r, str) else r for r in v]


class SelectConfig(Section):
    """Data-driven choice of what to train, ranked by a measured signal (chosen set saved with the artifact)."""

    by: Literal["snr"] = Field(
        "snr", description="snr: signal-to-noise ratio of each weight matrix's singular values (Spectrum, Hartford et al. 2024)."
    )
    unit: Literal["layers", "modules"] = Field(
        "layers", description="layers: rank decoder layers (mean SNR of their linears); modules: rank each linear "
        "within its kind (q_proj, ..., down_proj), like Spectrum."
    )
    fraction: float = Field(0.25, gt=0, le=1, description="Fraction of the ranked units to train (rounded up, at least 1).")


class FreezeConfig(Section):
    train: list[ParamRule] = Field(
        default_factory=list,
        description="Rules for what trains; when set, every other parameter is frozen. A rule has keys patterns, "
        "exclude, layers, first_layers, last_layers, modules (docs/partial_finetuning.md); a string is a regex.",
    )
    freeze: list[ParamRule] = Field(default_factory=list, description="Rules for what is frozen (applied last, wins); same keys as `train`.")
    select: SelectConfig | None = Field(None, description="Also train the top-ranked layers/modules by weight SNR: {by: snr, unit: layers|modules, fraction}.")

    @field_validator("train", "freeze", mode="before")
    @classmethod
    def _shorthand(cls, v):
        return _rules(v)

    @property
    def active(self) -> bool:
        return bool(self.train or self.freeze or self.select)
