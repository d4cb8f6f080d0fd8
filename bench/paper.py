"""The BitNet b1.58 paper's cost comparison on this machine (memory, latency, throughput, energy).

Same as ``bittern bench paper`` (all its options work here too)::

    python bench/paper.py --configs 700M,1.3B,3B,70B --threads 1
"""

from __future__ import annotations

import sys

from bittern.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "paper", *sys.argv[1:]]))
