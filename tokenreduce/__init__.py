"""tokenreduce: training-free token reduction for Hugging Face video, image and long-context LLMs.

    model = tokenreduce.patch(model, "framefusion", retention=0.3)
    model.generate(**inputs)
    tokenreduce.stats(model)
    tokenreduce.unpatch(model)
"""

from .api import calibrate, is_patched, load_profile, patch, save_profile, stats, unpatch
from .engine.stats import Stats
from .kernels import kernels_status  # compiled-kernel status (csrc/)
from .kv.namespace import namespace  # the per-request SemShare namespace: `with tokenreduce.namespace(user):`
from .kv.store import KVStore  # the cross-prompt KV store for semshare
from .methods import FastV, FrameFusion, Method, methods
from .models import supported_classes

__version__ = "0.1.0"

__all__ = ["FastV", "FrameFusion", "KVStore", "Method", "Stats", "calibrate", "is_patched", "kernels_status",
           "load_profile", "methods", "namespace", "patch", "save_profile", "stats", "supported_classes", "unpatch"]
