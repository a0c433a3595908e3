"""Base class for every configuration model: frozen, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A frozen pydantic model that rejects unknown keys.

    Every configuration section of medsynth derives from this class so that a typo in a YAML key
    is an error naming the key, and so that a resolved configuration cannot be mutated after it
    has been validated (use ``model_copy(update=...)`` to derive a changed copy).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
