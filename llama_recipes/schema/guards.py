"""`resume:` and `guards:`: what happens after a crash, and when a run is stopped as broken.

Both are run-control settings: changing them does not make a different run, so they are left
out of the recipe's identity (an output_dir of the same recipe resumes whatever they say).
"""
from pydantic import Field

from llama_recipes.schema.base import Section

RESUME_DESCRIPTION = (
    "auto: continue from the newest complete checkpoint in output_dir, else start fresh; never: start fresh; "
    "or a checkpoint-N path (docs/troubleshooting.md)."
)


class GuardsConfig(Section):
    max_bad_steps: int = Field(
        0, ge=0,
        description="Non-finite (NaN/inf) loss or gradient norm: such an update is skipped; after more than this "
        "many, training stops naming the step and the last good checkpoint.",
    )
    check_disk: bool = Field(True, description="Before training, check output_dir has room for a checkpoint.")


RUN_CONTROL_KEYS = ("resume", "guards")
