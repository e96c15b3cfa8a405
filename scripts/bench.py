#!/usr/bin/env python3
"""Benchmark the appliance against llama-cpp-python in process (same as `appliance bench`).

uv run python scripts/bench.py [--threads N] [--requests 2000] [--json bench-results/bench.json]
"""

import argparse
import sys

from appliance.bench import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
