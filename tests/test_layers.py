"""Imports only go downward (DESIGN.md): checked on the source with ast."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "medsynth"
LEVEL = {
    "protocol": 0,
    "protocol_edit": 0,
    "registry": 0,
    "dicom": 0,
    "utils": 0,
    "runfolder": 0,
    "data": 1,
    "diffusion": 1,
    "training": 2,
    "generation": 2,
    "evaluation": 3,
    "experiment": 4,
    "review": 4,
    "cli": 5,
    "cli_edit": 5,
}
FORBIDDEN = {
    "diffusion": {"data", "dicom"},
    "evaluation": {"training", "diffusion"},
    "dicom": {"torch"},
}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_imports_only_go_downward():
    problems = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        top = rel.parts[0].removesuffix(".py")
        if top == "__init__":
            continue
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] in FORBIDDEN.get(top, ()):
                problems.append(f"{rel} imports {mod}")
            if parts[0] != "medsynth" or len(parts) < 2 or parts[1] == "__init__":
                continue
            target = parts[1]
            if target in FORBIDDEN.get(top, ()):
                problems.append(f"{rel} imports {mod}")
            elif LEVEL.get(target, 0) > LEVEL[top]:
                problems.append(f"{rel} imports {mod} (level {LEVEL.get(target)} > {LEVEL[top]})")
    assert not problems, "\n".join(problems)


def test_only_dicom_package_touches_pydicom():
    offenders = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if p.relative_to(PKG).parts[0] != "dicom"
        and any(m.startswith("pydicom") for m in _imports(p))
    ]
    assert not offenders
