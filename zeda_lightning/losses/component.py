"""What objectives and router losses share as YAML components: a readable config (``class_path`` + the
``__init__`` arguments, nested components as their configs) and its inverse for configs read back from a checkpoint,
which only ever rebuilds this package's own classes."""

from __future__ import annotations

import inspect
from typing import Any


class Component:
    """A loss component whose ``__init__`` arguments are kept as same-named attributes."""

    def to_config(self) -> dict[str, Any]:
        cls = type(self)
        params = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
        init = {k: getattr(self, k) for k in params if hasattr(self, k)}
        init = {k: [t.to_config() if isinstance(t, Component) else t for t in v] if isinstance(v, list) else v
                for k, v in init.items()}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_config()['init_args'].items())})"


def from_saved_config(cfg: Any, classes: list[type], where: str) -> Any:
    """Rebuild a component from its ``to_config()`` (saved in a checkpoint's hyperparameters): only the package's
    own classes, by exact ``class_path``, with numeric init_args; nothing is imported because a file named it."""
    known = {f"{c.__module__}.{c.__qualname__}": c for c in classes}
    if not isinstance(cfg, dict) or cfg.get("class_path") not in known or not isinstance(cfg.get("init_args", {}), dict):
        raise ValueError(f"{where}: {cfg!r} is not a saved config of one of {sorted(known)}; a saved component is "
                         "rebuilt only from this package's classes: set it in your YAML")
    cls, init = known[cfg["class_path"]], dict(cfg.get("init_args") or {})
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = [k for k, v in init.items() if k not in params or not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{where}: {cls.__name__} init_args {bad} are unknown or not numbers")
    return cls(**init)
