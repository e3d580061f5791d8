"""Shared base for recipe sections: unknown keys are errors, every field has a description."""
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section. `extra="forbid"` makes a typo an error instead of a silent no-op."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())
