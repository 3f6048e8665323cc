"""trionats vs raw nats-py (plain asyncio) on the same server, in one run.

A thin wrapper over ``trionats bench`` (the workloads live in ``trionats/_bench.py`` so the
command line and this script measure exactly the same thing). Arguments are passed on:

    python benchmarks/bench_bridge.py --count 100000 --reps 5 --with-c --json out.json
"""

from __future__ import annotations

import sys

from trionats._cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
