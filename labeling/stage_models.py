"""Stage both models once, so no model actor downloads anything: the SAM checkpoint and the semantic
model at its resolved Hub commit, into a folder every node can read (a shared path), or into the
same local path on each node (run the command once per node).

    python -m labeling.stage_models --out /shared/models                  # vit_h + the default Mask2Former
    python -m labeling.stage_models --out /shared/models --semantic-revision <commit>
    python labeling/run.py ... --staged-models /shared/models              # actors load from it

The folder holds `sam/<checkpoint file>`, `semantic/` (the model's files at one commit) and
`staged.json`, which names them: SAM's type, file and SHA-256 (checked here, once), the semantic
model's hub repository and commit. A run given `--staged-models` records the same identities in its
manifest as a run that downloads (SAM by SHA-256, the semantic model by repository and commit), so
staging never changes what a resume compares; the head reads SAM's SHA-256 from `staged.json`
instead of downloading or hashing the 2.5 GB file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from labeling.labelers.model_choice import (  # noqa: E402
    DEFAULT_SAM_TYPE,
    DEFAULT_SEMANTIC_MODEL,
    STAGED_FILE,
    ModelLoadError,
    resolve_hub_revision,
)


def stage(out: str, sam_type: str = DEFAULT_SAM_TYPE, sam_checkpoint: str | None = None,
          semantic_model: str = DEFAULT_SEMANTIC_MODEL, semantic_revision: str | None = None, log=print) -> dict:
    """Copy (or download) both models into `out` and write `out/staged.json`; returns what it says."""
    from labeling.labelers.checkpoints import CheckpointError, file_sha256, load_sam, official_checkpoint

    os.makedirs(os.path.join(out, "sam"), exist_ok=True)
    try:
        source = sam_checkpoint or official_checkpoint(sam_type)  # an official file is verified on download
        load_sam(sam_type, source)  # refuses a file that is not this type's weights, before copying it
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from err
    sam_file = os.path.join("sam", os.path.basename(source))
    _copy(source, os.path.join(out, sam_file))
    sha256 = file_sha256(os.path.join(out, sam_file))
    log(f"SAM {sam_type}: {os.path.join(out, sam_file)} (sha256 {sha256[:12]}...)")

    semantic_dir = os.path.join(out, "semantic")
    if os.path.isdir(semantic_model):  # a local folder: copied as it is; it has no hub identity
        if semantic_revision:
            raise ModelLoadError(f"--semantic-revision was given, but {semantic_model} is a local folder: drop it")
        # copyfile, not copy2: new files take the umask's mode, so a source written 0600 (safetensors' own
        # files) is staged readable to the other users of a shared folder
        shutil.copytree(semantic_model, semantic_dir, dirs_exist_ok=True, copy_function=shutil.copyfile)
        repo, revision = None, None
    else:
        from huggingface_hub import snapshot_download

        repo, revision = semantic_model, resolve_hub_revision(semantic_model, semantic_revision)
        try:
            snapshot_download(repo, revision=revision, local_dir=semantic_dir)
        except Exception as err:  # offline, unknown, gated: one answer
            raise ModelLoadError(f"could not download {repo} at {revision} ({type(err).__name__}); stage it while "
                                 "online, or pass a local folder as --semantic-model") from err
    log(f"semantic model: {semantic_dir}" + (f" ({repo} at {revision})" if repo else ""))
    staged = {"instance": {"type": sam_type, "file": sam_file, "sha256": sha256},
              "semantic": {"folder": "semantic", "repo": repo, "revision": revision}}
    with open(os.path.join(out, STAGED_FILE), "w") as f:
        json.dump(staged, f, indent=2)
    return staged


def _copy(source: str, target: str) -> None:
    """`source` to `target` through a temporary name, so a reader never sees half a file."""
    if os.path.abspath(source) == os.path.abspath(target):
        return
    partial = f"{target}.partial"
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labeling.stage_models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to stage into (shared by the nodes, or one per node)")
    p.add_argument("--models", default="default", choices=("default", "tiny-random"),
                   help="default: SAM vit_h + the default semantic model; tiny-random: the random twins (tests)")
    p.add_argument("--sam-type", default=None, help="SAM model type: vit_h (default), vit_l, vit_b")
    p.add_argument("--sam-checkpoint", default=None, help="a SAM checkpoint file (default: the official one)")
    p.add_argument("--semantic-model", default=None, help=f"hub id or local folder (default {DEFAULT_SEMANTIC_MODEL})")
    p.add_argument("--semantic-revision", default=None, help="hub branch, tag or commit (default: the default branch)")
    args = p.parse_args(argv)
    try:
        if args.models == "tiny-random":
            from labeling.labelers.tiny_models import build_tiny_random_models

            tiny = build_tiny_random_models(os.path.join(args.out, "tiny-build"))
            stage(args.out, tiny.sam_model_type, tiny.sam_checkpoint, tiny.semantic_model)
            shutil.rmtree(os.path.join(args.out, "tiny-build"), ignore_errors=True)
        else:
            stage(args.out, args.sam_type or DEFAULT_SAM_TYPE, args.sam_checkpoint,
                  args.semantic_model or DEFAULT_SEMANTIC_MODEL, args.semantic_revision)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"staged: pass --staged-models {args.out} to labeling/run.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
