"""`appliance …` and `python -m appliance …`: for `serve`, a model worker's interpreter starts before the CLI's
own imports (appliance/prestart.py); everything else is appliance.cli."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launched = None
    if argv[:1] == ["serve"] and "-h" not in argv and "--help" not in argv:
        from appliance.prestart import launch

        launched = launch()
    from appliance.cli import main as cli_main

    try:
        return cli_main(argv, prestarted=launched)
    finally:
        if launched is not None:
            launched.discard()  # serve did not take it (another default model, an error): the child exits


if __name__ == "__main__":
    sys.exit(main())
