"""Vision-stage reduction: work the vision tower never does.

- :mod:`.static_units`: which Qwen-VL spatial merge units repeat the previous temporal patch (on pixels);
- :mod:`.qwen_partial`: Qwen2-VL / Qwen2.5-VL / Qwen3-VL towers run on a partial grid of kept units;
- :mod:`.tome`: token merging (bipartite matching, proportional attention) inside CLIP / SigLIP towers.
"""
