"""docker/Dockerfile: hadolint, plus the project's own rules (no Docker engine here, so these are static checks)."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deploy_helpers import GRPC_PORTS, METRICS_PORTS, REPO, SERVICES

DOCKERFILE = REPO / "docker" / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(path: Path) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for ins in instructions:
        if ins.keyword == "FROM":
            parts = ins.args.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = Stage(name, base)
        elif current is None:
            if ins.keyword == "ARG" and "=" in ins.args:
                key, _, value = ins.args.partition("=")
                global_args[key] = value
        else:
            current.instructions.append(ins)
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse(DOCKERFILE)


def test_hadolint(hadolint: str) -> None:
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def resolve(base: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)


def test_base_images_are_pinned(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    args, stages = dockerfile
    for stage in stages.values():
        if stage.base in stages:
            continue
        image = resolve(stage.base, args)
        name, _, tag = image.split("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"stage {stage.name}: base image {image!r} is not pinned"
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image


def test_stages(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    assert {"build", "runtime", "cli", *SERVICES} <= set(stages)
    for target in (*SERVICES, "cli"):
        assert stages[target].base == "runtime", f"{target} must build FROM runtime"


def test_no_add(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    for stage in stages.values():
        assert not stage.all("ADD"), f"stage {stage.name}: use COPY, not ADD"


def test_apt_get_hygiene(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    for stage in stages.values():
        for run in stage.all("RUN"):
            if "apt-get install" in run.args:
                assert "--no-install-recommends" in run.args, f"line {run.line}: --no-install-recommends missing"
                assert "apt-get update" in run.args, f"line {run.line}: update and install in one layer"
                assert "rm -rf /var/lib/apt/lists/*" in run.args, f"line {run.line}: apt lists not cleaned"
                assert re.search(r"apt-get install[^&|;]*\s-y\b", run.args), f"line {run.line}: not -y"


def test_runs_as_non_root(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    users = [u.args for u in stages["runtime"].all("USER")]
    assert users and users[-1].split(":")[0] == "10001", "runtime must end as user 10001"
    for target in (*SERVICES, "cli"):
        for u in stages[target].all("USER"):
            assert u.args.split(":")[0] not in {"0", "root"}, f"{target} switches back to root"


def test_models_are_fetched_at_build_time(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    assert any(
        "sightline.common.models.convert.fetch --models-dir /models" in r.args for r in stages["build"].all("RUN")
    )
    copies = [c.args for c in stages["runtime"].all("COPY")]
    assert "--from=build /models /models" in copies and "--from=build /opt/venv /opt/venv" in copies
    env = " ".join(e.args for e in stages["runtime"].all("ENV"))
    assert "SIGHTLINE_MODELS_DIR=/models" in env
    # Nothing is downloaded or installed once the build stage is over: the runtime needs no network.
    for name in ("runtime", *SERVICES, "cli"):
        for run in stages[name].all("RUN"):
            assert not re.search(r"\b(pip|apt-get|curl|wget)\b", run.args), f"{name} line {run.line} downloads"


def test_service_targets(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    for svc in SERVICES:
        stage = stages[svc]
        (cmd,) = stage.all("CMD")
        assert json.loads(cmd.args) == ["python", "-m", f"sightline.{svc}"]
        exposed = {int(p) for e in stage.all("EXPOSE") for p in e.args.split()}
        assert exposed == {GRPC_PORTS[svc], METRICS_PORTS[svc]}
        (health,) = stage.all("HEALTHCHECK")
        assert "sightline.common.healthcheck" in health.args
        assert f"SIGHTLINE_{svc.upper()}_GRPC_PORT:-{GRPC_PORTS[svc]}" in health.args
    (entry,) = stages["cli"].all("ENTRYPOINT")
    assert json.loads(entry.args) == ["sightline"]


def test_no_secrets_in_env_or_args(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    args, stages = dockerfile
    secret = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE|(^|_)KEY$|CREDENTIAL|DSN|DATABASE_URL)", re.I)
    names = list(args)
    for stage in stages.values():
        for ins in stage.all("ENV") + stage.all("ARG"):
            names += [m.group(1) for m in re.finditer(r"(\w+)=", ins.args)] or [ins.args.split()[0]]
    leaked = [n for n in names if secret.search(n)]
    assert not leaked, f"secret-looking names baked into the image: {leaked}"


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "start from excluding everything"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "protos", "services"}
    # Everything the Dockerfile copies from the context is allowed.
    copied = re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE.read_text(), re.M)
    assert {c.rstrip("/") for c in copied} <= allowed


def test_readme_documents_every_target() -> None:
    readme = (REPO / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile --target detection -t sightline/detection:0.1.0 ." in readme
    for target in (*SERVICES, "cli"):
        assert f"`{target}`" in readme
