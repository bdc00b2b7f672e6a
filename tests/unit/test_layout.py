"""The import boundaries of the source tree: services talk to each other over gRPC and Kafka, not imports.

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts as much as
one at the top of a module:

- no service (capture, detection, embedding, matching, decision) imports another: what two of them share
  lives in ``sightline.common``;
- neither a service nor common imports ``sightline.tooling`` or ``sightline.cli`` (the operator's and the
  developer's tools sit above the services, never below);
- only the converters themselves, cli and tooling import ``sightline.common.models.convert``: the converters
  run at install time and need packages (onnx, dlib) a running service does not have.
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).parents[2] / "services"
SERVICES = ("capture", "detection", "embedding", "matching", "decision")
TOOLS = ("tooling", "cli")
CONVERT = "sightline.common.models.convert"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file; ``from a import b`` yields both ``a`` and ``a.b``, as ``b``
    may be a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # A relative import would hide a boundary from this test; the tree uses absolute imports only.
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(path: Path, root: Path = SOURCE) -> list[str]:
    """What ``path`` (a file under ``root``, services/) imports across a boundary, each as
    ``file:line: module (rule)``."""
    relative = path.relative_to(root)
    home = relative.parts[0]
    name = relative.as_posix()
    found: list[str] = []
    for line, module in imported_modules(path):
        if module.startswith("."):
            found.append(f"{name}:{line}: {module} (relative import)")
            continue
        parts = module.split(".")
        if parts[0] != "sightline" or len(parts) < 2:
            continue
        target = parts[1]
        if home in SERVICES and target in SERVICES and target != home:
            found.append(f"{name}:{line}: {module} (a service imports another service)")
        if (home in SERVICES or home == "common") and target in TOOLS:
            found.append(f"{name}:{line}: {module} ({home} imports {target})")
        in_convert = relative.parts[:3] == ("common", "models", "convert")
        if _within(module, CONVERT) and home not in TOOLS and not in_convert:
            found.append(f"{name}:{line}: {module} (the install-time converters imported at run time)")
    return found


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checker_sees_every_kind_of_violation(tmp_path: Path) -> None:
    # The rules read the path below services/: a fake tree with one violation of each kind, then allowed ones.
    cases = {
        "capture/a.py": "from sightline.matching.names import check_subject_id\n",
        "matching/b.py": "def f():\n    import sightline.decision.engine\n",
        "common/c.py": "from sightline.tooling import samples\n",
        "detection/d.py": "from sightline.cli.main import main\n",
        "embedding/e.py": "from sightline.common.models import convert\n",
        "common/models/f.py": "from sightline.common.models.convert.fetch import fetch\n",
        "decision/g.py": "from . import engine\n",
    }
    _write(tmp_path, cases)
    assert {name: bool(violations(tmp_path / name, tmp_path)) for name in cases} == dict.fromkeys(cases, True)
    allowed = {
        "capture/ok.py": "from sightline.capture.kiosk import mrz\nfrom sightline.common import subjects\n",
        "tooling/ok.py": "import sightline.matching.service\nfrom sightline.common.models import convert\n",
        "cli/ok.py": "import sightline.decision.service\nfrom sightline.tooling import kube\n",
        "common/models/convert/ok.py": "from sightline.common.models.convert.dlib_resnet import convert\n",
    }
    _write(tmp_path, allowed)
    assert {name: violations(tmp_path / name, tmp_path) for name in allowed} == {name: [] for name in allowed}


def test_no_import_crosses_a_boundary() -> None:
    files = sorted(SOURCE.rglob("*.py"))
    assert any(path.relative_to(SOURCE).parts[0] == "capture" for path in files)
    found = [problem for path in files for problem in violations(path)]
    assert found == []


def test_the_formatter_owns_the_layout() -> None:
    """`ruff format` lays out every line (make lint checks it): no region or line is exempted from it."""
    markers = ("fmt: " + "skip", "fmt: " + "off", "yapf: " + "disable")  # split, so this file does not match itself
    roots = (SOURCE, Path(__file__).parents[1])
    found = [
        f"{path}:{number}"
        for root in roots
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(marker in line for marker in markers)
    ]
    assert found == []
