"""Shared pydantic configuration and reusable constrained types."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Model(BaseModel):
    """Base of every reelflow model: immutable, and a misspelt field is an error, not a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")


DType = Literal["float32", "float16", "bfloat16"]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
StageId = Annotated[
    str,
    Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        max_length=64,
        description="A stage's id in the pipeline: lowercase letters, digits and underscores.",
    ),
]
