"""The SemShare namespace of the current request: ``with tokenreduce.namespace(user_id): model.generate(...)``.

A namespace belongs to a request, not to the patched model: a server shares one patched model between
tenants, and a model-wide namespace (what ``patch(..., namespace=...)`` used to set) let one request
store or read under another's while both ran. The namespace lives in a :class:`contextvars.ContextVar`,
so it is private to the thread (and to the asyncio task) that entered the block; calls outside every
block use ``"default"`` (or raise, with ``require_namespace=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

DEFAULT = "default"
_CURRENT: ContextVar[str | None] = ContextVar("tokenreduce_namespace", default=None)


@contextmanager
def namespace(name: str) -> Iterator[str]:
    """Run the enclosed model calls of this thread / task in SemShare namespace ``name``: their prompts are
    stored under it and only its entries are reused. Blocks nest (the innermost wins)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a namespace must be a non-empty string (e.g. the tenant's id), got {name!r}")
    token = _CURRENT.set(name)
    try:
        yield name
    finally:
        _CURRENT.reset(token)


def current_namespace(required: bool = False) -> str:
    """The namespace of the innermost enclosing :func:`namespace` block; ``"default"`` outside every block,
    or a ValueError there when ``required``."""
    name = _CURRENT.get()
    if name is not None:
        return name
    if required:
        raise ValueError("semshare was patched with require_namespace=True and this call runs outside "
                         "`with tokenreduce.namespace(user_id): ...`; enter the block in the thread that calls the "
                         "model (asyncio.to_thread carries it, a thread pool's workers do not)")
    return DEFAULT
