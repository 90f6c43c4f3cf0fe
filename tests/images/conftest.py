"""Fixtures for the image tests: a container engine that can run containers, and the two
images built by scripts/images.sh (cached layers make a second build a few seconds).

Where no engine can be found or installed (not root, no apt-get), the tests are skipped with
the reason; in CI (CI=true) that is a failure: CI must never pass without running the images.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

# The tests import their helpers from images_support.py beside this file (pytest runs with
# --import-mode=importlib, which puts no test folder on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from images_support import (  # noqa: E402
    BUILD_TIMEOUT, Engine, can_install, engine_from_env_output, images_sh, in_ci,
)


def _unavailable(message: str) -> None:
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def engine() -> Engine:
    """docker (when its daemon answers) or podman, configured by scripts/images.sh; installed
    with apt-get when this machine has neither and we are root."""
    proc = images_sh("env")
    found = engine_from_env_output(proc.stdout) if proc.returncode == 0 else None
    if found is None or found.name not in ("docker", "podman"):
        if not can_install():
            _unavailable("no container engine that runs containers (docker with a running daemon, "
                         "or podman), and it cannot be installed here (needs root and apt-get): "
                         f"{proc.stderr.strip() or (found and found.name)}")
        installed = images_sh("install", timeout=1800)
        if installed.returncode != 0:
            _unavailable(f"scripts/images.sh install failed:\n{installed.stdout[-2000:]}"
                         f"\n{installed.stderr[-2000:]}")
        proc = images_sh("env", env={"CHATBOT_CONTAINER_ENGINE": "podman"}
                         if found is not None and found.name == "buildah" else None)
        if proc.returncode != 0:
            _unavailable(f"no container engine after installing one: {proc.stderr.strip()}")
        found = engine_from_env_output(proc.stdout)
    return found


class BuiltImages:
    """Builds each image once per session (with the layer cache, a rebuild is quick)."""

    def __init__(self, engine: Engine, logs: Path) -> None:
        self.engine = engine
        self.logs = logs
        self.names: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def get(self, which: str) -> str:
        if which not in self.names:
            env = {"CHATBOT_CONTAINER_ENGINE": self.engine.name}
            log = self.logs / f"build-{which}.log"
            start = time.monotonic()
            proc = images_sh("build", "--torch", "cpu", which, env=env, timeout=BUILD_TIMEOUT,
                             log=log)
            self.seconds[which] = time.monotonic() - start
            if proc.returncode != 0:
                pytest.fail(f"scripts/images.sh build --torch cpu {which} failed (log: {log}):\n"
                            f"{proc.stdout[-4000:]}")
            name = images_sh("name", "--torch", "cpu", which, env=env).stdout.strip()
            self.engine.run("image", "inspect", name, check=True)
            self.names[which] = name
        return self.names[which]


@pytest.fixture(scope="session")
def images(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> BuiltImages:
    return BuiltImages(engine, tmp_path_factory.mktemp("image-builds"))


@pytest.fixture(scope="session")
def trainer_image(images: BuiltImages) -> str:
    return images.get("trainer")


@pytest.fixture(scope="session")
def operator_image(images: BuiltImages) -> str:
    return images.get("operator")
