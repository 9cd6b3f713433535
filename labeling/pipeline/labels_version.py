"""The labels version: what the labels mean, as a number we bump by hand, and the check that keeps it honest.

A labeled folder's manifest and every shard's footer hash (`manifest.labels_hash`) carry
`LABELS_VERSION`, not a hash of files: a rerun under code of the same labels version resumes,
whatever comments, docstrings or refactors changed meanwhile. The discipline is ours:
`LABEL_CODE_DIGEST` records `label_code_digest()` for the code of this labels version, and a test
fails when the code that shapes labels changes without it being recorded again. Then, if labels
can change, bump `LABELS_VERSION` too (folders labeled before then resume only with --overwrite);
if not (a refactor), record the new digest only:

    python -m labeling.pipeline.labels_version    # prints the digest to put in LABEL_CODE_DIGEST

The digest covers each module's syntax tree with docstrings removed (comments never reach the
tree), dumped without line numbers, so reformatting and rewording leave it unchanged.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

# Bump when labels made by the same models and arguments can change (and record the digest below).
LABELS_VERSION = 3
LABEL_CODE_DIGEST = "ddc5ecb3075a31501622807178aa096a2a8208122f8f1cdc3d388200d4c6bac1"

# The code whose change can change a label: the labelers, the read / model / post-process stages,
# and the contract's codecs, painting rule and schema. The driver, writer, card and docs are not in
# it: editing them never needs a new labels version.
LABEL_CODE = ("labeling/labelers", "labeling/pipeline/preprocess.py", "labeling/pipeline/predictors.py",
              "labeling/pipeline/postprocess.py", "dataset_card/contract/codecs.py", "dataset_card/contract/painting.py",
              "dataset_card/contract/schema.py", "dataset_card/contract/invariants.py")

REPO = Path(__file__).resolve().parents[2]
DIGEST_COMMAND = "python -m labeling.pipeline.labels_version"


def label_code_files(root: Path = REPO) -> list[Path]:
    """The LABEL_CODE modules under `root`, in a fixed order."""
    files = []
    for entry in LABEL_CODE:
        path = root / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def syntax(source: str) -> str:
    """A module's syntax tree without docstrings (or any other bare string statement: they do
    nothing), in a form that does not depend on the Python version's optional empty fields."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                 and isinstance(s.value.value, str))]
    return _dump(tree)


def _dump(node) -> str:
    if isinstance(node, ast.AST):  # fields only: no line numbers; None and [] left out (3.12 added type_params=[])
        fields = (f"{name}={_dump(value)}" for name, value in ast.iter_fields(node)
                  if value is not None and not (isinstance(value, list) and not value))
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return f"[{', '.join(_dump(item) for item in node)}]"
    return repr(node)


def label_code_digest(root: Path = REPO) -> str:
    """sha256 over the LABEL_CODE modules' paths and syntax trees (`syntax`)."""
    digest = hashlib.sha256()
    for path in label_code_files(root):
        digest.update(f"{path.relative_to(root).as_posix()}\n".encode())
        digest.update(syntax(path.read_text(encoding="utf-8")).encode())
    return digest.hexdigest()


if __name__ == "__main__":
    print(label_code_digest())
