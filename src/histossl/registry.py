"""Name -> builder registries for methods and backbones (refuses duplicate names)."""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from histossl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from a name to a builder; registering a name twice is a bug and raises."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._configs: dict[str, type | None] = {}

    def register(self, name: str, config: type | None = None) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("simclr", config=SimCLRConfig)``; ``config`` is the
        dataclass of the item's own settings (None: it has none)."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            self._configs[name] = config
            return item

        return add

    def get(self, name: str) -> T:
        """The builder registered as ``name``; a ConfigError that lists the known names otherwise."""
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def config(self, name: str) -> type | None:
        """The settings dataclass registered with ``name`` (None: it has no settings)."""
        self.get(name)
        return self._configs[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
