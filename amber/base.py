"""The one base class every Amber config model derives from.

Python names are snake_case, the resource's YAML is camelCase (Kubernetes convention); both
are accepted on input and camelCase is what is written out. Unknown fields are errors, so a
typo in a resource is rejected instead of silently ignored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def dump(self) -> dict:
        """The camelCase form, as it appears in a resource (defaults included)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
