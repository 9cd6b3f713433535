"""The house's layering, read from every module's imports (function-level imports included).

- `labeling/` and `pretraining/` never import each other; `dataset_card/` (their contract) imports neither.
- Inside a package, a part imports only parts below its own floor (FLOORS): `labeling/inputs` may not
  import `labeling/pipeline`, and parts on one floor stay independent of each other.
- The command modules (what users run) import no other command module.
A new sub-package or top-level module needs a floor in FLOORS: the test says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("labeling", "pretraining", "dataset_card")

# Each part of a package (a sub-package or a top-level module) and its floor: a part imports only
# parts on lower floors of its own package, and anything of dataset_card's contract below it.
FLOORS = {
    "dataset_card": {"__init__.py": 0, "contract": 0, "card": 1, "synthetic": 2, "validate.py": 2, "repaint.py": 2,
                     "publish.py": 2, "show.py": 2,
                     "__main__.py": 3},
    "labeling": {"__init__.py": 0, "inputs": 1, "labelers": 1, "quality": 1, "pipeline": 2, "run.py": 3,
                 "evaluate.py": 3, "stage_models.py": 3},
    "pretraining": {"__init__.py": 0, "models": 1, "evaluation": 1, "data": 2, "training": 3, "train.py": 4,
                    "export.py": 4, "evaluate.py": 4, "study": 5},
}
COMMANDS = {"labeling/run.py", "labeling/evaluate.py", "labeling/stage_models.py", "pretraining/train.py", "pretraining/export.py",
            "pretraining/evaluate.py", "dataset_card/__main__.py"}


def _modules(root: Path) -> list[Path]:
    return sorted(p for stage in STAGES for p in (root / stage).rglob("*.py"))


def _part(parts: tuple[str, ...]) -> tuple[str, str]:
    """(package, part) of a module path's parts relative to the root, e.g. ("labeling", "pipeline")."""
    return parts[0], parts[1] if len(parts) > 1 else "__init__.py"


def _imported(path: Path, root: Path) -> set[tuple[str, str, str]]:
    """(package, part, command path or "") of every import of our packages in `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            dotted = name.split(".")
            if dotted[0] not in STAGES:
                continue
            # the longest prefix that is a module or a package (the rest names a function or a class)
            prefixes = [Path(*dotted[:k]) for k in range(len(dotted), 0, -1)]
            module = next((p for p in prefixes if (root / p).with_suffix(".py").is_file() or (root / p).is_dir()),
                          Path(dotted[0]))
            parts = module.with_suffix(".py").parts if (root / module).with_suffix(".py").is_file() else module.parts
            command = Path(*parts).as_posix() if len(parts) == 2 and parts[1].endswith(".py") else ""
            found.add((*_part(parts), command))
    return found


def violations(root: Path, stage: str) -> list[str]:
    """Every import of `stage`'s modules under `root` that breaks the rules above, one line each."""
    wrong = []
    for path in _modules(root):
        rel = path.relative_to(root)
        if rel.parts[0] != stage:
            continue
        package, part = _part(rel.parts)
        floor = FLOORS[package].get(part)
        for dst_package, dst_part, command in _imported(path, root):
            if dst_package != package:
                if package == "dataset_card" or dst_package != "dataset_card":
                    wrong.append(f"{rel} imports {dst_package}/ (labeling and pretraining share only dataset_card)")
                continue
            if dst_part in (part, "__init__.py"):
                continue
            dst_floor = FLOORS[package].get(dst_part)
            if floor is not None and dst_floor is not None and dst_floor >= floor:
                wrong.append(f"{rel} imports {package}/{dst_part}, which is not below it")
            if rel.as_posix() in COMMANDS and command in COMMANDS:
                wrong.append(f"{rel} imports the command module {command}")
    return wrong


def test_every_part_has_a_floor():
    unplaced = {"/".join(_part(p.relative_to(ROOT).parts)) for p in _modules(ROOT)
                if _part(p.relative_to(ROOT).parts)[1] not in FLOORS[p.relative_to(ROOT).parts[0]]}
    assert not unplaced, f"give {sorted(unplaced)} a floor in tests/test_layering.py FLOORS (what may it import?)"


@pytest.mark.parametrize("stage", STAGES)
def test_imports_follow_the_floors(stage):
    wrong = violations(ROOT, stage)
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checker itself, on a made-up tree: each forbidden import is reported, an allowed one is not."""
    files = {
        "labeling/pipeline/failures.py": "",
        "labeling/inputs/listing.py": "from labeling.pipeline import failures\n",  # a lower part importing up
        "labeling/run.py": "from labeling.pipeline.failures import X\nimport labeling.evaluate\n",
        "labeling/evaluate.py": "def main(): import pretraining.models\n",  # across the stages
        "pretraining/models/x.py": "from dataset_card.contract import schema\n",  # allowed
        "dataset_card/contract/schema.py": "from labeling.inputs import listing\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = [line for stage in STAGES for line in violations(tmp_path, stage)]
    assert sorted(found) == sorted([
        "labeling/inputs/listing.py imports labeling/pipeline, which is not below it",
        "labeling/run.py imports labeling/evaluate.py, which is not below it",
        "labeling/run.py imports the command module labeling/evaluate.py",
        "labeling/evaluate.py imports pretraining/ (labeling and pretraining share only dataset_card)",
        "dataset_card/contract/schema.py imports labeling/ (labeling and pretraining share only dataset_card)",
    ])
