"""One small generic registry: components register by name with a decorator.

    POLICIES = Registry("policy")

    @POLICIES.register("max-prob")
    class MaxProb(...): ...

Unknown names raise an `EexitError` that lists the valid names and a "did you mean" guess.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from eexit.errors import EexitError

T = TypeVar("T")


def unknown_name_error(kind: str, name: str, valid: list[str]) -> EexitError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return EexitError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(sorted(valid))}")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            if hasattr(obj, "__dict__") and not callable(getattr(obj, "registered_name", None)):
                try:
                    obj.registered_name = name  # type: ignore[attr-defined]
                except (AttributeError, TypeError):
                    pass
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise unknown_name_error(self.kind, name, list(self._items))
        return self._items[name]

    def remove(self, name: str) -> None:
        """Unregister a name (tests that register a component undo it with this)."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_submodules(package: str) -> None:
    """Import every module of a package (in name order), so that what they define registers."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package}.{info.name}")
