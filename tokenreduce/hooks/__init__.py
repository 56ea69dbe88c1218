"""What both engines (visual :mod:`tokenreduce.engine`, KV :mod:`tokenreduce.kv`) need from transformers'
extension points, in one place: the marks they leave on a model (here), the attention-function registration
(:mod:`.attention`, transformers' ``AttentionInterface``), and the cache side (:mod:`.cache`): the
position-carrying layer both engines' layers derive from and growing a cache's layer list.

This module itself imports nothing, so ``tokenreduce.api`` can name the marks without loading transformers'
modeling code.
"""

ENGINE_ATTR = "_tokenreduce_engine"  # the visual engine on attention modules; api's Installed on the model
KV_ATTR = "_tokenreduce_kv"  # the KV engine (or a calibration observer) on every attention module it serves
