"""The base of every stage's pydantic config (``pipeline/manifest.py`` composes them)."""
from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
