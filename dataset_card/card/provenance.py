"""The card's "How it was produced" section: the models and their settings, the run's facts (versions,
inputs, shards, time), and the environments that made the labels, from a `RunSummary`."""

from __future__ import annotations

import json
from collections.abc import Sequence

from dataset_card.card.markdown import duration, table
from dataset_card.card.run_summary import RunSummary


def production(summary: RunSummary) -> str:
    manifest, run = summary.manifest, summary.run_stats
    models = manifest.get("models") or {}
    out = ["## How it was produced"]
    if models:
        out.append(table(["role", "model", "checkpoint", "revision", "sha256"],
                         [(role, f"`{m.get('name', '?')}`", f"`{m.get('checkpoint') or '-'}`",
                           f"`{m['revision']}`" if m.get("revision") else "-",
                           f"`{m['sha256']}`" if m.get("sha256") else "-") for role, m in models.items()]))
        params = [(role, f"`{k}`", json.dumps(v)) for role, m in models.items()
                  for k, v in sorted((m.get("params") or {}).items())]
        if params:
            out.append("Thresholds and settings:\n\n" + table(["model", "parameter", "value"], params))
    else:
        out.append(f"The manifest names no models (semantic source: `{summary.metadata.semantic_source or '?'}`).")
    facts = [("dataset schema version", summary.metadata.schema_version)]
    for key, name in (("labels_version", "labels version"), ("code_version", "code version"), ("created", "created"),
                      ("num_inputs", "inputs"),
                      ("num_shards", "shards"), ("shard_size", "images per shard"), ("inputs_hash", "inputs sha256")):
        if manifest.get(key) is not None:
            facts.append((name, f"`{manifest[key]}`" if key in ("code_version", "inputs_hash") else manifest[key]))
    sample = (manifest.get("execution") or {}).get("sample")
    if sample is not None and manifest.get("planned_inputs") is not None:  # a trial: `--sample N`
        facts.append(("sample", f"class-stratified, {manifest.get('num_inputs')} of {manifest['planned_inputs']:,} "
                                f"inputs (`--sample {sample}`, seed {(manifest.get('execution') or {}).get('sample_seed', 0)}"
                                "); the shards are planned for all of them"))
    if run.get("wall_time_s") is not None:
        facts.append(("wall time", duration(run["wall_time_s"])))
    if run.get("gpu_hours") is not None:
        facts.append(("GPU-hours in the models", f"{run['gpu_hours']:.2f}"))
    if run.get("billed_gpu_hours") is not None:  # the model actors' lifetimes: what the cluster bills
        facts.append(("GPU-hours billed", f"{run['billed_gpu_hours']:.2f}"))
    if run.get("images_per_s") is not None:
        facts.append(("throughput", f"{run['images_per_s']:.3g} images/s"))
    for stage, seconds in (run.get("stage_time_s") or {}).items():
        facts.append((f"time in stage `{stage}`", duration(seconds)))
    if not summary.environments:  # a folder from before footers named them: the manifest's record
        for name, version in (manifest.get("software") or {}).items():
            facts.append((f"`{name}`", version or "not installed"))
    for record in manifest.get("repaints") or []:
        facts.append(("repainted", f"{record.get('created', '?')}: rule `{(record.get('rule') or {}).get('name')}` "
                                   f"(from schema v{record.get('from_schema_version')})"))
    out.append(table(["", ""], facts))
    if summary.environments:
        out.append(environments_table(summary.environments))
    if manifest.get("arguments"):
        out.append("<details><summary>Labeling arguments</summary>\n\n```json\n"
                   + json.dumps(manifest["arguments"], indent=2, sort_keys=True) + "\n```\n\n</details>")
    return "\n\n".join(out)


def environments_table(environments: Sequence[tuple[dict, int]]) -> str:
    """The environments that made the labels (one column each, with the data files it made rows of)."""
    keys = sorted({k for env, _ in environments for k in env})

    def shown(value) -> str:
        return "-" if value is None else ("on" if value else "off") if isinstance(value, bool) else f"`{value}`"

    header = ["", *(f"{n} data file{'s' if n > 1 else ''}" for _, n in environments)]
    return ("The environments that made the labels, as each data file's footer records them (a resumed run may "
            "have labeled under newer libraries or on other GPUs):\n\n"
            + table(header, [(f"`{k}`", *(shown(env.get(k)) for env, _ in environments)) for k in keys]))
