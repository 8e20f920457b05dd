"""A local Hugging Face Hub for tests (pytest plugin, loaded from conftest.py `pytest_plugins`).

At import time, before anything imports `huggingface_hub`, this module points the client at a local
server (`tests/hubserver.py`) on a free port and gives it a private HF_HOME, so no test can reach
the real Hub. Fixtures:

- `hub_server` (session): the running `HubServer` with `.url`, `.tokens`, `.data_dir`, `.stats`,
  `.alice`/`.bob`/`.reader` token strings, `reset_stats()`, `new_repo_id(user)`, `seed_repo(...)`,
  `fail(...)`/`heal()` for network-failure tests.
- `hub_env` (function): an environment dict for running the `lorahub` CLI in a subprocess against
  the server with a fresh HF_HOME; `hub_env.with_token(tok)` adds HF_TOKEN, `hub_env.run(*args,
  token=None)` runs `python -m lorahub.cli ARGS` and returns the CompletedProcess.
"""
from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hubserver import HubServer


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _free_port()
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"
_HF_HOME = tempfile.mkdtemp(prefix="lorahub-test-hfhome-")
atexit.register(shutil.rmtree, _HF_HOME, True)

HUB_ENV_VARS = {
    "HF_ENDPOINT": HUB_URL,
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_ETAG_TIMEOUT": "10",
    "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    "LORAHUB_NO_PROGRESS": "1",
}
# variables that would point the client elsewhere or authenticate it
_SCRUB = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
          "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH",
          "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_ASSETS_CACHE", "HF_XET_CACHE", "TRANSFORMERS_CACHE")

for _name in _SCRUB:
    os.environ.pop(_name, None)
os.environ.update({k: v for k, v in HUB_ENV_VARS.items() if v})
os.environ["HF_HOME"] = _HF_HOME


def _patch_already_imported_client() -> None:
    """huggingface_hub reads these at import; if a plugin imported it first, fix its constants."""
    from huggingface_hub import constants

    constants.ENDPOINT = HUB_URL
    constants.HUGGINGFACE_CO_URL_TEMPLATE = HUB_URL + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_DISABLE_TELEMETRY = True
    constants.HF_HUB_OFFLINE = False
    constants.HF_HOME = _HF_HOME
    constants.HF_HUB_CACHE = os.path.join(_HF_HOME, "hub")
    constants.HUGGINGFACE_HUB_CACHE = constants.HF_HUB_CACHE
    constants.HF_TOKEN_PATH = os.path.join(_HF_HOME, "token")
    constants.HF_STORED_TOKENS_PATH = os.path.join(_HF_HOME, "stored_tokens")
    if hasattr(constants, "HF_ASSETS_CACHE"):
        constants.HF_ASSETS_CACHE = os.path.join(_HF_HOME, "assets")


if "huggingface_hub" in sys.modules:  # pragma: no cover - depends on installed pytest plugins
    _patch_already_imported_client()

TOKENS = {
    "hf_test_alice_write": {"user": "alice", "role": "write", "orgs": ["lorahub-org"]},
    "hf_test_bob_write": {"user": "bob", "role": "write", "orgs": []},
    "hf_test_alice_read": {"user": "alice", "role": "read", "orgs": []},
}


class TestHub(HubServer):
    """HubServer plus conveniences for tests."""

    __test__ = False  # not a test class
    alice = "hf_test_alice_write"
    bob = "hf_test_bob_write"
    reader = "hf_test_alice_read"  # alice's read-only token

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ids = itertools.count(1)

    def new_repo_id(self, user: str = "alice", prefix: str = "repo") -> str:
        """A repo id nobody used yet in this session (the server is shared by all tests)."""
        return f"{user}/{prefix}-{os.getpid()}-{next(self._ids)}"


_server: TestHub | None = None


def get_hub() -> TestHub:
    global _server
    if _server is None:
        _server = TestHub(port=HUB_PORT, tokens=dict(TOKENS)).start()
        atexit.register(_server.stop)
    return _server


@pytest.fixture(scope="session")
def hub_server() -> TestHub:
    hub = get_hub()
    yield hub
    hub.heal()


class HubEnv(dict):
    """Environment for a `lorahub` subprocess talking to the test Hub."""

    def __init__(self, base: dict, cwd: Path):
        super().__init__(base)
        self.cwd = cwd

    def with_token(self, token: str | None) -> "HubEnv":
        env = HubEnv(self, self.cwd)
        if token:
            env["HF_TOKEN"] = token
        else:
            env.pop("HF_TOKEN", None)
        return env

    def run(self, *args: str, token: str | None = None, env: dict | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        full = dict(self.with_token(token) if token else self)
        full.update(env or {})
        return subprocess.run([sys.executable, "-m", "lorahub.cli", *map(str, args)], env=full, cwd=self.cwd,
                              capture_output=True, text=True, timeout=timeout, input=input)


@pytest.fixture
def hub_env(hub_server: TestHub, tmp_path: Path) -> HubEnv:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update({k: v for k, v in HUB_ENV_VARS.items() if v})
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return HubEnv(env, work)
