"""The Hugging Face engine: hooks that apply visual methods inside an unmodified transformers forward.

``hf.HFEngine`` installs them (install/undo, generate tracking, the per-layer hooks); its jobs live in small
modules: ``prefill`` (the current rows), ``reduction`` (a Selection applied; importance scores), ``slicing``
(positions and masks of reduced layers), ``deepstack``, ``freeze`` (frozen layers, an attention observer),
``composition`` (which methods compose), ``vision`` (the vision stage's hand-over) and ``context``
(``HFMethodContext``, all a method's ``setup`` sees). ``stats.Stats`` reports what they did. Import the
submodules directly: the engine pulls in transformers' modeling code, which ``import tokenreduce`` avoids.
"""
