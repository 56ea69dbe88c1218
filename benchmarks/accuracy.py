"""Accuracy benchmark: ``tokenreduce eval`` as a script (same options; see ``--help``).

    python benchmarks/accuracy.py --model /path/to/Qwen2.5-VL-7B-Instruct --format videomme --data Video-MME \\
        --methods framefusion,fastv --retentions 0.1,0.3,0.5 --frames 32 --out results/videomme
    python benchmarks/accuracy.py --tiny --needle --out /tmp/needle-eval   # plumbing check, random weights
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("tokenreduce") is None:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenreduce.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
