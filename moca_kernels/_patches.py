"""Attributes that moca's patch functions set on objects they do not own (transformers' classes and
modules), each recorded with what it replaced, so that ``revert`` puts everything back."""
from __future__ import annotations

_PATCHES: list[tuple[object, str, object]] = []
_ABSENT = object()


def set_attr(owner: object, name: str, value) -> None:
    """``setattr(owner, name, value)``, remembering the first value it replaces (or its absence)."""
    if not any(o is owner and n == name for o, n, _ in _PATCHES):
        _PATCHES.append((owner, name, vars(owner).get(name, _ABSENT)))
    setattr(owner, name, value)


def revert() -> None:
    """Undo every ``set_attr``, newest first."""
    while _PATCHES:
        owner, name, original = _PATCHES.pop()
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
