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


def test_the_worker_interpreter_starts_before_anything_but_the_standard_library() -> None:
    """`appliance serve` starts the model worker's interpreter first (appliance/prestart.py): what it imports
    before then is the standard library and, of the appliance, that module and the entry point."""
    script = (
        "import json, sys; before = set(sys.modules); import appliance.__main__, appliance.prestart; "
        "new = set(sys.modules) - before; "
        "print(json.dumps([sorted({m.split('.')[0] for m in new}), sorted(m for m in new if 'appliance' in m)]))"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    top, ours = json.loads(r.stdout)
    others = {m for m in top if not m.startswith("__")} - set(sys.stdlib_module_names)  # __mp_main__: an alias
    assert others == {"appliance"}, top
    assert ours == ["appliance", "appliance.__main__", "appliance.prestart"]
