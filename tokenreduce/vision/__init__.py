"""Vision-stage reduction math, free of any engine or model family: work the vision tower never does.

- :mod:`.static_units`: which Qwen-VL spatial merge units repeat the previous temporal patch (on pixels);
- :mod:`.tome`: token merging (bipartite matching, proportional attention) inside pre-norm ViT towers
  (CLIP, SigLIP, DINOv2), each layer seen through the :class:`.tome.EncoderBlock` its family describes.

The hooks that run them are the methods' own (``methods.static``, ``methods.tome_vision``); running a Qwen-VL
tower on a partial grid is model-family knowledge (``models.qwen_partial``).
"""
