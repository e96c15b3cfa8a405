#!/usr/bin/env python3
"""Benchmark the appliance side by side with other OpenAI-compatible servers (same as `appliance bench`).

uv run python scripts/bench.py --llama-server /path/to/llama-server          # start both, same model
uv run python scripts/bench.py --against other=http://127.0.0.1:8081 --pid other=1234
uv run python scripts/bench.py --quick                                        # a functional check only

Prints one column per server and the ratio appliance / other per measure; writes bench-results/bench.json.
See `appliance/bench.py` for every option.
"""

import argparse
import sys

from appliance.bench import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
