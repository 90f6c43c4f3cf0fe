"""Helpers for the image tests: the container engine, the images, and Kubernetes pod specs
turned into `docker run` / `podman run` command lines.

The engine and its configuration come from scripts/images.sh (the same set-up `make images`
uses); the images are built by it with `--torch cpu` (a CPU build of torch: the tests run on
CPU machines).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_SH = REPO_ROOT / "scripts" / "images.sh"
# Cold: a local base (debootstrap, ~6 min) and both images (~15 min on 2 busy cores).
BUILD_TIMEOUT = 3600


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def images_sh(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120,
              log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run scripts/images.sh; with `log`, its output goes there (builds are long)."""
    command = ["bash", str(IMAGES_SH), *args]
    if log is None:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, cwd=REPO_ROOT)
    with open(log, "w") as handle:
        proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO_ROOT)
    proc.stdout = log.read_text()
    return proc


@dataclass(frozen=True)
class Engine:
    """docker or podman, with the environment scripts/images.sh configured it with."""

    name: str
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 600, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.name, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env}, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name} {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, *args: str, log: Path) -> subprocess.Popen:
        handle = open(log, "w")
        return subprocess.Popen([self.name, *args], stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, **self.env})

    def remove(self, container: str) -> None:
        self.run("rm", "--force", container, timeout=120)


def engine_from_env_output(text: str) -> Engine:
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    name = values.pop("ENGINE")
    return Engine(name=name, env=values)


# ------------------------------------------------------------------------------ pod → run


@dataclass
class Sources:
    """Where a pod's volumes come from on this machine: claims and config maps are host
    folders (the test writes the config map's files there), emptyDirs are tmpfs."""

    claims: dict[str, Path] = field(default_factory=dict)
    config_maps: dict[str, Path] = field(default_factory=dict)
    field_refs: dict[str, str] = field(default_factory=dict)


def _tmpfs(mount_path: str, empty_dir: Mapping[str, Any]) -> str:
    options = ["rw", "exec", "mode=1777"]
    size = empty_dir.get("sizeLimit")
    if size:
        options.append("size=" + str(size).lower().replace("i", ""))  # 64Mi → 64m
    return f"{mount_path}:{','.join(options)}"


def run_args(engine: Engine, pod: Mapping[str, Any], sources: Sources, *, name: str,
             termination_log: Path | None = None, network: str = "none",
             env_overrides: Mapping[str, str] | None = None,
             extra_env: Mapping[str, str] | None = None,
             extra_mounts: list[str] | None = None) -> list[str]:
    """`run` arguments that start the pod's first container as the kubelet would: its image,
    args, env, user, read-only root filesystem, dropped capabilities, no privilege
    escalation, its volumes (claims and config maps bind-mounted, emptyDirs as tmpfs) and the
    termination message file at its terminationMessagePath."""
    container = pod["containers"][0]
    security = {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}
    args = ["run", "--name", name, f"--network={network}"]
    uid = security.get("runAsUser")
    if uid is not None:
        args += ["--user", f"{uid}:{security.get('runAsGroup', uid)}"]
    elif security.get("runAsNonRoot"):
        raise AssertionError("runAsNonRoot without runAsUser: the image's USER must be numeric")
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
        if engine.name == "podman":
            args.append("--read-only-tmpfs=false")  # only the pod's own emptyDirs are writable
    for cap in (security.get("capabilities") or {}).get("drop", []):
        args += ["--cap-drop", cap]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        path, read_only = mount["mountPath"], bool(mount.get("readOnly"))
        if "emptyDir" in volume:
            args += ["--tmpfs", _tmpfs(path, volume["emptyDir"])]
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            read_only = read_only or bool(claim.get("readOnly"))
            host = sources.claims[claim["claimName"]]
            args += ["--volume", f"{host}:{path}:{'ro' if read_only else 'rw'}"]
        elif "configMap" in volume:
            host = sources.config_maps[volume["configMap"]["name"]]
            args += ["--volume", f"{host}:{path}:ro"]
        else:
            raise AssertionError(f"volume {volume} has no source on this machine")
    for item in container.get("env", []):
        if "value" in item:
            value = item["value"]
        else:
            value = sources.field_refs[item["valueFrom"]["fieldRef"]["fieldPath"]]
        if env_overrides and item["name"] in env_overrides:
            value = env_overrides[item["name"]]
        args += ["--env", f"{item['name']}={value}"]
    for key, value in (extra_env or {}).items():
        args += ["--env", f"{key}={value}"]
    for mount in extra_mounts or []:
        args += ["--volume", mount]
    if termination_log is not None:
        args += ["--volume", f"{termination_log}:{container.get('terminationMessagePath', '/dev/termination-log')}:rw"]
    if container.get("command"):
        args += ["--entrypoint", container["command"][0]]
        rest = list(container["command"][1:])
    else:
        rest = []
    args.append(container["image"])
    return args + rest + list(container.get("args", []))


def termination_file(directory: Path, uid: int) -> Path:
    """An empty file the container's user may write, as the kubelet provides."""
    path = directory / "termination-log"
    path.write_text("")
    os.chown(path, uid, uid)
    path.chmod(0o666)
    return path


def wait_until(predicate, timeout: float, message: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)
