"""The Hugging Face engine: hooks that apply methods inside an unmodified transformers forward."""

from .hf import HFEngine
from .stats import Stats

__all__ = ["HFEngine", "Stats"]
