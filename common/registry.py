"""Name -> factory registries for preprocessors, backends, postprocessors and renderers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from inferline.common.errors import ConfigError, quoted

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict and a decorator: a new model family adds one registered function, nothing more."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str, error: type[Exception] = ConfigError) -> T:
        """The item, or ``error`` naming the known ones: ConfigError for names from config files,
        InvalidInput for names that arrive in a request."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise error(f"unknown {self.kind} {quoted(name)} (known: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
