"""The Hugging Face engine: hooks that apply methods inside an unmodified transformers forward.

``hf.HFEngine`` installs them; ``stats.Stats`` reports what they did. Import the submodules
directly: the engine pulls in transformers' modeling code, which ``import tokenreduce`` avoids.
"""
