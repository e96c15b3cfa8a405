"""Settings precedence, the models file, and clear one-line errors for bad configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.backends import default_factories
from appliance.config import ConfigError, load_models_file, load_settings
from appliance.engine.registry import Registry


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("APPLIANCE_PORT", "APPLIANCE_HOST", "APPLIANCE_DATA_DIR", "APPLIANCE_MODELS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults() -> None:
    s = load_settings()
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.default_model == "smollm2-135m-instruct"
    assert s.default_max_tokens > 0 and s.context_size >= 2048 and s.threads >= 1
    assert s.drain_timeout == 30


def test_precedence_cli_over_config_over_env_over_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("APPLIANCE_PORT=8001\nAPPLIANCE_THREADS=3\nAPPLIANCE_HOST=0.0.0.0\n")
    assert load_settings().port == 8001
    monkeypatch.setenv("APPLIANCE_PORT", "8002")
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "d"))
    s = load_settings()
    assert (s.port, s.threads, s.host, s.data_dir) == (8002, 3, "0.0.0.0", tmp_path / "d")
    cfg = tmp_path / "appliance.toml"
    cfg.write_text("port = 8003\ncontext_size = 1024\n")
    s = load_settings(cfg)
    assert (s.port, s.context_size, s.threads) == (8003, 1024, 3)
    assert load_settings(cfg, port=8004).port == 8004


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"APPLIANCE_PORT": "99999"}, "APPLIANCE_PORT"),
        ({"APPLIANCE_PORT": "eighty"}, "APPLIANCE_PORT"),
        ({"APPLIANCE_CONTEXT_SIZE": "-1"}, "APPLIANCE_CONTEXT_SIZE"),
        ({"APPLIANCE_DEFAULT_MAX_TOKENS": "0"}, "APPLIANCE_DEFAULT_MAX_TOKENS"),
        ({"APPLIANCE_LOG_LEVEL": "loud"}, "APPLIANCE_LOG_LEVEL"),
    ],
)
def test_invalid_settings_name_the_setting(monkeypatch: pytest.MonkeyPatch, env: dict, needle: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "serve", "--port", "70000"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "APPLIANCE_PORT" in lines[0], r.stderr
    assert "Traceback" not in r.stderr

    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "m"\n[[models.backends]]\ntype = "llamacpp"\n')
    r = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "serve", "--models-file", str(models)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "APPLIANCE_MODELS_FILE" in r.stderr and "path" in r.stderr


def write_models(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "models.toml"
    p.write_text(text)
    return p


def test_models_file_and_default_alias(tmp_path: Path) -> None:
    p = write_models(
        tmp_path,
        """
[[models]]
id = "smol"
aliases = ["tiny"]
[[models.backends]]
type = "llamacpp"
path = "embedded:smollm2"
context_size = 2048

[[models]]
id = "gemma"
[[models.backends]]
type = "llamacpp"
path = "embedded:gemma3-270m"
""",
    )
    s = load_settings(models_file=p, default_model="smol")
    reg = Registry(s, load_models_file(s), default_factories(s))
    assert reg.get("default").id == "smol"
    assert reg.get("tiny").id == "smol"
    assert reg.get("gemma").id == "gemma"
    assert reg.get("smol").spec.backends[0].context_size == 2048


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[models]]\nid = 'a'\n", "backends"),
        ("[[models]]\nid = 'a'\n[[models.backends]]\ntype = 'nope'\npath = 'x'\n", "type"),
        ("[[models]]\nid = 'a'\n[[models.backends]]\ntype = 'llamacpp'\npath = 'x'\nbogus = 1\n", "bogus"),
        ("[[models]]\nid = 'a b'\n[[models.backends]]\ntype = 'llamacpp'\npath = 'x'\n", "id"),
        ("[[models]]\nid = 'a'\n[[models.backends]]\npath = 'x'\n", "type"),
        ("not toml [", "invalid TOML"),
    ],
)
def test_bad_models_file(tmp_path: Path, text: str, needle: str) -> None:
    s = load_settings(models_file=write_models(tmp_path, text))
    with pytest.raises(ConfigError) as e:
        load_models_file(s)
    assert needle in str(e.value)


def test_default_model_must_exist(tmp_path: Path) -> None:
    s = load_settings(default_model="missing")
    with pytest.raises(ConfigError, match="APPLIANCE_DEFAULT_MODEL"):
        load_models_file(s)
    p = write_models(
        tmp_path,
        "[[models]]\nid = 'a'\naliases = ['default']\n[[models.backends]]\ntype = 'llamacpp'\npath = 'x'\n"
        "[[models]]\nid = 'b'\n[[models.backends]]\ntype = 'llamacpp'\npath = 'y'\n",
    )
    s = load_settings(models_file=p, default_model="b")
    with pytest.raises(ConfigError, match="default"):
        Registry(s, load_models_file(s), default_factories(s))


def test_example_models_file_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "models" / "models.example.toml"
    s = load_settings(models_file=example)
    models = load_models_file(s)
    assert [b.type for b in models.models[0].backends] == ["llamacpp", "ollama", "remote"]
