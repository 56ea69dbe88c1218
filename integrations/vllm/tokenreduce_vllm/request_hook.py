"""Per-request settings through vLLM's OpenAI server (chat and completions).

A request's ``vllm_xargs`` reach only its sampling parameters, which neither the multimodal processor
(it fixes the placeholder count) nor the model sees; its ``mm_processor_kwargs`` reach both. This hook
copies the ``tokenreduce_*`` keys of ``vllm_xargs`` into ``mm_processor_kwargs``, and lets those keys
through vLLM's refusal of untrusted per-request processor kwargs (``--trust-request-mm-kwargs``): they
can only lower a request's cost, since the server's settings cap what a request may keep. Every other
processor kwarg is checked by vLLM as before.
"""

from __future__ import annotations

import functools
from typing import Any

from .settings import split_request


def move_xargs(request: Any) -> None:
    """Copy the ``tokenreduce_*`` keys of ``request.vllm_xargs`` into ``request.mm_processor_kwargs``."""
    ours, _ = split_request(getattr(request, "vllm_xargs", None))
    if ours:
        request.mm_processor_kwargs = {**(getattr(request, "mm_processor_kwargs", None) or {}), **ours}


def install_request_hook() -> None:
    try:
        from vllm.renderers import online_renderer
    except ImportError:  # a vLLM without the online renderer: per-request settings only offline
        return
    renderer = online_renderer.OnlineRenderer
    if getattr(renderer.preprocess_chat, "_tokenreduce", False):
        return
    check = online_renderer.validate_request_mm_kwargs

    @functools.wraps(check)
    def validate_request_mm_kwargs(*, mm_processor_kwargs=None, **kwargs):
        _, rest = split_request(mm_processor_kwargs)
        return check(mm_processor_kwargs=rest or None, **kwargs)

    online_renderer.validate_request_mm_kwargs = validate_request_mm_kwargs
    for name in ("preprocess_chat", "preprocess_cmpl"):
        _wrap(renderer, name)


def _wrap(cls, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    async def preprocess(self, request, *args, **kwargs):
        move_xargs(request)
        return await original(self, request, *args, **kwargs)

    preprocess._tokenreduce = True
    setattr(cls, name, preprocess)
