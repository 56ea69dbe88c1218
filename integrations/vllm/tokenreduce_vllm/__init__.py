"""tokenreduce for vLLM: token reduction before the LLM, as a vLLM general plugin.

``vllm serve MODEL --additional-config '{"tokenreduce": {"method": "evs", "retention": 0.3}}'``.
vLLM calls :func:`register` in every process (front end, engine core, workers). It replaces the
supported model classes by subclasses that reduce video tokens when settings are given (and behave
exactly as vLLM's own classes when not), checks the settings when vLLM builds its config, so a bad
value fails at start-up, and lets a request choose its own settings (``vllm_xargs`` or
``mm_processor_kwargs``: ``tokenreduce_method``, ``tokenreduce_retention``) within the server's.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Entry point of ``vllm.general_plugins``; safe to call more than once."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from .config_hook import install_config_hook
    from .runner_hook import install_runner_hook
    from .settings import MODELS

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    install_config_hook()
    install_runner_hook()
    _registered = True
