"""Static checks of the two Dockerfiles (no Docker engine needed).

They catch what breaks a `docker build` or a deployment late: a COPY source that is missing or
excluded by .dockerignore, a package directory setuptools needs that is not copied, an
ENTRYPOINT that is not a console script, versions that drift from constraints.txt, root users.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from deploy_support import REPO_ROOT

DOCKERFILES = {
    "trainer": REPO_ROOT / "trainer-image" / "Dockerfile",
    "operator": REPO_ROOT / "operator" / "Dockerfile",
}
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def args(self) -> dict[str, str]:
        """ARG defaults of the whole file (global and per stage)."""
        values = dict(self.global_args)
        for stage in self.stages:
            for spec in stage.all("ARG"):
                if "=" in spec:
                    key, value = spec.split("=", 1)
                    values[key] = value
        return values

    def expand(self, text: str) -> str:
        """Substitute ARG defaults, also inside other defaults (BASE_IMAGE uses PYTHON_VERSION)."""
        args = self.args()
        for _ in range(5):
            text = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)
        return text


def parse(path: Path) -> Dockerfile:
    """A small Dockerfile parser: comments, line continuations, stages, instructions."""
    logical: list[str] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append(buffer + stripped)
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path}: {keyword} before FROM"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args=global_args, stages=stages)


LOCKS = {"operator": "constraints.txt", "trainer": "trainer-image/constraints.txt"}


def constraints(image: str = "operator") -> dict[str, str]:
    """The pins an image installs with: the trainer has its own lock (see its header)."""
    pins = {}
    for line in (REPO_ROOT / LOCKS[image]).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerignore_excludes(rel_path: str) -> bool:
    """Whether .dockerignore keeps `rel_path` out of the build context (last match wins;
    a pattern that matches a parent folder matches everything in it)."""
    patterns = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    parts = Path(rel_path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = glob_regex(pattern)
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def glob_regex(pattern: str) -> str:
    """Docker's pattern syntax: `**` spans folders, `*` and `?` stay within one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def copy_sources(stage: Stage) -> list[tuple[str, str]]:
    """(source, destination) of the stage's COPY/ADD from the build context."""
    pairs = []
    for keyword in ("COPY", "ADD"):
        for args in stage.all(keyword):
            words = shlex.split(args)
            if any(w.startswith("--from") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            *sources, dest = words
            pairs.extend((src, dest) for src in sources)
    return pairs


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    return request.param, parse(DOCKERFILES[request.param])


# ---------------------------------------------------------------------------- build context


def test_copied_files_exist_and_are_in_the_build_context(image: tuple[str, Dockerfile]) -> None:
    _, dockerfile = image
    for stage in dockerfile.stages:
        for src, _ in copy_sources(stage):
            path = REPO_ROOT / src
            assert path.exists(), f"COPY {src}: not in the repository"
            assert not dockerignore_excludes(src.rstrip("/")), f"COPY {src}: excluded by .dockerignore"
            if path.is_dir():
                for child in path.rglob("*.py"):
                    rel = child.relative_to(REPO_ROOT).as_posix()
                    assert not dockerignore_excludes(rel), f"{rel}: excluded by .dockerignore"


def test_dockerignore_keeps_out_local_state() -> None:
    for path in (".venv/bin/python", ".git/config", "tests/deploy/test_dockerfiles.py",
                 "benchmarks/results.json", "workspace/train/adapter", "model.q8_0.gguf",
                 ".cache/bin/helm", "operator/chatbot_api/__pycache__/spec.cpython-311.pyc",
                 "examples/data/out.gguf"):
        assert dockerignore_excludes(path), path
    for path in ("pyproject.toml", "constraints.txt", "operator/chatbot_api/spec.py",
                 "trainer-image/chatbot_trainer/cli.py", "examples/data/support.jsonl"):
        assert not dockerignore_excludes(path), path


def test_every_package_directory_is_copied(image: tuple[str, Dockerfile]) -> None:
    """`pip install .` runs setuptools, which needs every package-dir and the readme."""
    _, dockerfile = image
    copied = {src.rstrip("/") for stage in dockerfile.stages for src, _ in copy_sources(stage)}
    setuptools = PYPROJECT["tool"]["setuptools"]
    for package, directory in setuptools["package-dir"].items():
        assert any(directory == c or directory.startswith(c + "/") for c in copied), (
            f"package {package} ({directory}) is not copied"
        )
    readme = PYPROJECT["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, f"pyproject readme {readme} is not copied"
    assert "pyproject.toml" in copied and LOCKS[image[0]] in copied


# ---------------------------------------------------------------------------- versions


def test_pip_installs_use_constraints(image: tuple[str, Dockerfile]) -> None:
    _, dockerfile = image
    installs = [
        cmd for stage in dockerfile.stages for run in stage.all("RUN")
        for cmd in re.split(r"&&|;", run) if re.search(r"\bpip install\b", cmd)
    ]
    assert installs
    for cmd in installs:
        assert "-c constraints.txt" in cmd, f"pip install without the pins: {cmd.strip()}"


def pinned_in_dockerfile(dockerfile: Dockerfile) -> list[tuple[str, str]]:
    """Every `name==version` the Dockerfile's instructions name, ARG defaults substituted."""
    text = " ".join(args for stage in dockerfile.stages for _, args in stage.instructions)
    return re.findall(r"([A-Za-z][A-Za-z0-9_.-]*)==([^\s\"';)]+)", dockerfile.expand(text))


def test_pinned_versions_match_constraints(image: tuple[str, Dockerfile]) -> None:
    """Each version the Dockerfile pins by hand is the lock's: a package missing from the lock
    (renamed, dropped) or pinned to another version fails here, not in a late image build."""
    name_, dockerfile = image
    pins = constraints(name_)
    pinned = pinned_in_dockerfile(dockerfile)
    for name, version in pinned:
        assert normalise(name) in pins, f"{name}=={version}: not in {LOCKS[name_]}"
        assert version == pins[normalise(name)], f"{name}=={version} vs {LOCKS[name_]}"
    if name_ == "trainer":
        assert {normalise(n) for n, _ in pinned} >= {"torch", "llama-cpp-python", "diskcache"}


def test_pinned_versions_drift_is_detected() -> None:
    """The check above sees a drifted pin (a Dockerfile edited without the lock)."""
    dockerfile = parse(DOCKERFILES["trainer"])
    drifted = Dockerfile(dockerfile.global_args, [
        Stage(s.base, s.name, [(kw, args.replace("llama-cpp-python==", "llama-cpp-python==9.9.9-"))
                               for kw, args in s.instructions]) for s in dockerfile.stages])
    pins = constraints("trainer")
    assert any(normalise(n) == "llama-cpp-python" and v != pins["llama-cpp-python"]
               for n, v in pinned_in_dockerfile(drifted))


def test_build_script_reads_the_same_pins() -> None:
    """scripts/images.sh stages wheels by the lock's torch and llama-cpp-python versions and
    makes a local base of the Dockerfiles' Debian release and Python minor version."""
    script = (REPO_ROOT / "scripts" / "images.sh").read_text()
    assert "sed -n 's/^torch==//p' trainer-image/constraints.txt" in script
    assert "sed -n 's/^llama-cpp-python==//p' trainer-image/constraints.txt" in script
    python = re.search(r"^PYTHON_MINOR=(\S+)$", script, re.M).group(1)
    release = re.search(r"^DEBIAN_RELEASE=(\S+)$", script, re.M).group(1)
    for path in DOCKERFILES.values():
        dockerfile = parse(path)
        assert dockerfile.args()["PYTHON_VERSION"] == python
        base = dockerfile.expand(dockerfile.global_args["BASE_IMAGE"])
        assert base == f"docker.io/library/python:{python}-slim-{release}", base
        assert all(stage.base == "${BASE_IMAGE}" for stage in dockerfile.stages), path


def test_trainer_torch_matches_constraints() -> None:
    dockerfile = parse(DOCKERFILES["trainer"])
    torch = constraints("trainer")["torch"]
    assert dockerfile.args()["TORCH_VERSION"] == torch
    runs = " ".join(r for stage in dockerfile.stages if stage.name == "build" for r in stage.all("RUN"))
    assert 'torch==${TORCH_VERSION}' in runs


def test_trainer_lock_agrees_with_the_main_lock() -> None:
    """Both locks pin the same versions, except python-dateutil (botocore needs <3 and the
    kubernetes client >=3, so only the operator side has 4.x) and packages only one side has."""
    trainer, main = constraints("trainer"), constraints("operator")
    differing = {n for n in trainer.keys() & main.keys() if trainer[n] != main[n]}
    assert differing <= {"python-dateutil"}, {n: (trainer[n], main[n]) for n in differing}
    for needed in ("torch", "transformers", "peft", "gguf", "boto3", "botocore"):
        assert needed in trainer


def test_operator_image_has_no_torch() -> None:
    dockerfile = parse(DOCKERFILES["operator"])
    runs = " ".join(r for stage in dockerfile.stages for r in stage.all("RUN"))
    assert '".[operator]"' in runs and "trainer" not in re.findall(r'"\.\[([^\]]*)\]"', runs)[0]
    assert "torch==" not in runs
    extra = PYPROJECT["project"]["optional-dependencies"]["operator"] + PYPROJECT["project"]["dependencies"]
    assert not [d for d in extra if normalise(re.split(r"[<>=!~;\[ ]", d)[0]) == "torch"]


def test_extras_exist(image: tuple[str, Dockerfile]) -> None:
    _, dockerfile = image
    runs = " ".join(r for stage in dockerfile.stages for r in stage.all("RUN"))
    extras = PYPROJECT["project"]["optional-dependencies"]
    for group in re.findall(r'"\.\[([^\]]*)\]"', runs):
        for extra in group.split(","):
            assert extra.strip() in extras, extra
    for extra in re.findall(r'optional-dependencies"\]\["(\w+)"\]', runs):
        assert extra in extras, extra


def test_base_images_are_pinned_and_python_fits(image: tuple[str, Dockerfile]) -> None:
    _, dockerfile = image
    for stage in dockerfile.stages:
        base = dockerfile.expand(stage.base)
        assert ":" in base and not base.endswith(":latest"), base
    python = dockerfile.args()["PYTHON_VERSION"]
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python + ".0")
    # constraints.txt was frozen on this Python; the images use the same minor version.
    import sys

    assert python == f"{sys.version_info.major}.{sys.version_info.minor}"


# ---------------------------------------------------------------------------- runtime


def test_entrypoint_is_a_console_script(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    (entrypoint,) = dockerfile.final.all("ENTRYPOINT")
    command = json.loads(entrypoint)  # exec form: signals reach the process
    scripts = PYPROJECT["project"]["scripts"]
    assert command[0] in scripts
    assert command[0] == {"trainer": "chatbot-trainer", "operator": "chatbot-operator"}[name]


def test_final_stage_runs_as_non_root(image: tuple[str, Dockerfile]) -> None:
    _, dockerfile = image
    users = dockerfile.final.all("USER")
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "use a numeric non-root uid (runAsNonRoot checks it)"
    assert not gid or int(gid) != 0
    # The user is created in the image.
    runs = " ".join(dockerfile.final.all("RUN"))
    assert f"--uid {uid}" in runs


def test_trainer_environment() -> None:
    dockerfile = parse(DOCKERFILES["trainer"])
    env = " ".join(dockerfile.final.all("ENV"))
    for setting in ("HF_HOME=/workspace/", "HF_HUB_DISABLE_TELEMETRY=1", "HOME=/tmp",
                    "CHATBOT_PVC_ROOT=/mnt/pvc", "PYTHONUNBUFFERED=1"):
        assert setting in env, setting
    assert dockerfile.final.all("WORKDIR") == ["/workspace"]


def test_trainer_bundles_the_example_data() -> None:
    """examples/chatbottraining-minimal.yaml reads a path inside the trainer image."""
    dockerfile = parse(DOCKERFILES["trainer"])
    copies = dict(copy_sources(dockerfile.final))
    dest = copies["examples/data/"]
    minimal = yaml.safe_load((REPO_ROOT / "examples" / "chatbottraining-minimal.yaml").read_text())
    data_path = minimal["spec"]["trainingData"]
    assert data_path.startswith(dest)
    assert (REPO_ROOT / "examples" / "data" / data_path[len(dest):]).is_file()


def test_operator_exposes_the_chart_ports() -> None:
    dockerfile = parse(DOCKERFILES["operator"])
    values = yaml.safe_load((REPO_ROOT / "helm" / "chatbot-training" / "values.yaml").read_text())
    exposed = {int(p) for args in dockerfile.final.all("EXPOSE") for p in args.split()}
    assert exposed == {values["metrics"]["port"], values["health"]["port"]}


def test_trainer_image_fits_the_step_jobs() -> None:
    """The operator's step containers set only args (the step first), run as CHATBOT_STEP_UID,
    and mount the workspace where the image expects it."""
    from chatbot_api.spec import ChatbotTrainingSpec
    from chatbot_operator import manifests
    from chatbot_operator.settings import OperatorConfig

    dockerfile = parse(DOCKERFILES["trainer"])
    spec = ChatbotTrainingSpec.model_validate({"trainingData": "/data/x.jsonl"})
    args = manifests.step_args(spec, "train")
    assert args[0] == "train"
    assert json.loads(dockerfile.final.all("ENTRYPOINT")[0]) == ["chatbot-trainer"]
    uid = int(dockerfile.final.all("USER")[-1].split(":")[0])
    values = yaml.safe_load((REPO_ROOT / "helm" / "chatbot-training" / "values.yaml").read_text())
    assert uid == OperatorConfig().step_uid == values["trainer"]["runAsUser"]
    workspace = args[args.index("--workspace") + 1]
    assert dockerfile.final.all("WORKDIR")[-1] == workspace


def test_build_script_names_images_as_the_chart_does() -> None:
    """`make images` tags the chart's default repositories with its appVersion, so a cluster
    that loads the images runs the chart with no values set."""
    import subprocess

    chart = yaml.safe_load((REPO_ROOT / "helm" / "chatbot-training" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO_ROOT / "helm" / "chatbot-training" / "values.yaml").read_text())
    script = str(REPO_ROOT / "scripts" / "images.sh")

    def name(*args: str) -> str:
        proc = subprocess.run(["bash", script, "name", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert name("operator") == f"{values['image']['repository']}:{chart['appVersion']}"
    assert name("trainer") == f"{values['trainer']['image']['repository']}:{chart['appVersion']}"
    assert name("--torch", "cpu", "trainer") == f"{values['trainer']['image']['repository']}:{chart['appVersion']}-cpu"
    assert name("--torch", "cpu", "operator") == name("operator")
