"""Start-up stays light: building the app imports no optional client or heavy library.

`appliance serve` must answer /health soon after start and hold little memory before anything is used, so
the `openai` SDK, the `ollama` client, `gguf` (numpy), torch, Chroma and LangGraph load only when a backend
or a feature needs them. Checked in a fresh interpreter, whose sys.modules is not shared with other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = [
    "openai",
    "ollama",
    "gguf",
    "numpy",
    "torch",
    "sentence_transformers",
    "transformers",
    "chromadb",
    "langgraph",
    "langchain_core",
    "llama_cpp",
    "opentelemetry",
    "psycopg",
    "redis",
]

SCRIPT = """
import json, sys, tempfile
from pathlib import Path
import appliance.cli
appliance.cli.build_parser()  # every subcommand's parser, as `appliance serve` builds them
import appliance.server
from appliance.app import create_app
from appliance.config import Settings
tmp = Path(tempfile.mkdtemp())
create_app(Settings(_env_file=None, data_dir=tmp / "data", keys_file=tmp / "keys.toml"))
loaded = sorted(m for m in HEAVY if m in sys.modules)
import gguf  # the check can fail: a heavy import shows up
print(json.dumps([loaded, sorted(m for m in HEAVY if m in sys.modules)]))
"""


def test_building_the_app_imports_no_optional_client_or_heavy_library() -> None:
    code = f"HEAVY = {HEAVY!r}\n{SCRIPT}"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    loaded, then = json.loads(out.strip().splitlines()[-1])
    assert loaded == []
    assert "gguf" in then and "numpy" in then
