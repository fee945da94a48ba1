"""Shared pydantic configuration: camelCase field names as upstream, unknown fields rejected."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


class Schema(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_dict(self) -> dict:
        """The manifest form: camelCase keys, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Partial(Schema):
    """A part of an upstream object of which podnet reads only some fields.

    The other fields upstream defines (UPSTREAM_ONLY, camelCase) are accepted and
    dropped; any field upstream does not define is refused as unknown, as
    `kubectl --validate=strict` refuses it (a misspelt `selecter` must not pass as
    a Service without a selector)."""

    UPSTREAM_ONLY: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _drop_upstream_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and not cls.UPSTREAM_ONLY.isdisjoint(data):
            return {k: v for k, v in data.items() if k not in cls.UPSTREAM_ONLY}
        return data
