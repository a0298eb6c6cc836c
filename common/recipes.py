"""Stage recipes: a named operation plus parameters, as a model's config declares it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from google.protobuf import json_format, struct_pb2

from inferline.common.errors import ConfigError, InvalidInput, quoted
from inferline.common.generated import types_pb2


@dataclass(frozen=True)
class Recipe:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_proto(self) -> types_pb2.Recipe:
        params = struct_pb2.Struct()
        params.update(dict(self.params))
        return types_pb2.Recipe(name=self.name, params=params)

    @classmethod
    def from_proto(cls, message: types_pb2.Recipe) -> Recipe:
        """Parsed once per distinct recipe and process: every request for a model carries the
        same recipe, and turning a Struct into a dict costs more than serialising it to look
        it up. The cached params are shared: callers read them, never change them."""
        if not message.name:
            raise InvalidInput("recipe has no name; take it from the model's metadata")
        return _parsed(message.name, message.params.SerializeToString(deterministic=True))

    @classmethod
    def from_config(cls, raw: Any, where: str) -> Recipe:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"{where}: expected a mapping with a 'name' (and optional 'params')")
        params = raw.get("params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.params: expected a mapping")
        return cls(raw["name"], dict(params))


@lru_cache(maxsize=256)
def _parsed(name: str, params: bytes) -> Recipe:
    try:
        values = json_format.MessageToDict(struct_pb2.Struct.FromString(params))
    except ValueError:  # json_format refuses NaN and infinity in a Struct (JSON has neither)
        raise InvalidInput(
            f"recipe {quoted(name)} has a NaN or infinite parameter; parameters are finite numbers"
        ) from None
    return Recipe(name, values)
