"""The README's runbook ("Running the real job") and workflows/label_imagenet.sh show only flags the
commands they run have: a renamed or removed flag fails here, not on a user's cluster."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Ray's own CLI flags the runbook shows (`ray start`, `ray job submit`), checked by hand against
# `ray start --help` and `ray job submit --help` (Ray 2.60): its CLI takes seconds to start.
RAY_FLAGS = {"--head", "--address", "--dashboard-host", "--working-dir", "--runtime-env-json"}


def help_flags(main, argv: list[str]) -> set[str]:
    """The options a command's `--help` lists (its argparse parser, run in this process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return set(FLAG.findall(out.getvalue()))


@pytest.fixture(scope="module")
def commands() -> dict[str, set[str]]:
    """Flags of each command the runbook runs, keyed by how a command line names it."""
    from dataset_card.__main__ import main as dataset_card_main
    from labeling import stage_models
    from labeling.run import parser

    return {"labeling/run.py": {o for a in parser()._actions for o in a.option_strings},
            "labeling.stage_models": help_flags(stage_models.main, []),
            "dataset_card validate": help_flags(dataset_card_main, ["validate"])}


def runbook() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Running the real job")
    return text[start:text.index("\n## ", start + 1)]


def command_lines(text: str) -> list[str]:
    """Each command of the text's bash blocks (continuation lines joined, comments dropped), and each
    inline code span."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split(" #", 1)[0])
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def test_every_command_in_the_runbook_has_the_flags_it_shows(commands):
    # workflows/label_imagenet.sh passes its extra arguments to labeling/run.py
    names = {**commands, "label_imagenet.sh": commands["labeling/run.py"]}
    checked = 0
    for line in command_lines(runbook()):
        for name, flags in names.items():
            if name in line:
                shown = set(FLAG.findall(line.split(name, 1)[1]))
                assert shown <= flags, f"the runbook's `{line.strip()}` shows {sorted(shown - flags)}, which {name} lacks"
                checked += 1
    assert checked >= 5  # staging, the trial, the full run, validating twice


def test_every_flag_the_runbook_names_exists_somewhere(commands):
    known = set().union(*commands.values()) | RAY_FLAGS
    unknown = sorted(set(FLAG.findall(runbook())) - known)
    assert not unknown, f"the runbook names flags no command it runs has: {unknown}"


def test_the_imagenet_script_passes_flags_labeling_has(commands):
    script = (ROOT / "workflows" / "label_imagenet.sh").read_text()
    run_line = script[script.index("ray job submit"):].replace("\\\n", " ").splitlines()[0]
    shown = set(FLAG.findall(run_line.split("labeling/run.py", 1)[1]))
    assert {"--input", "--output", "--models"} <= shown <= commands["labeling/run.py"]
    header = " ".join(line.lstrip("# ") for line in script.splitlines() if line.startswith("#"))
    header = re.sub(r"`python -m pretraining\.train[^`]*`", "", header)  # the trainer's flags: not this job's
    unknown = set(FLAG.findall(header)) - RAY_FLAGS - set().union(*commands.values())
    assert not unknown, f"workflows/label_imagenet.sh's comments name flags its commands lack: {sorted(unknown)}"


def settings_row(flag: str) -> list[str]:
    """The cells after the flag's own in the runbook's table of settings per model actor."""
    row = re.search(rf"^\| `{re.escape(flag)}`[^|]*\|(.*)\|$", runbook(), flags=re.M)
    assert row, f"the runbook's settings table has no row for {flag}"
    return [cell.strip() for cell in row.group(1).split("|")]


def test_the_runbooks_defaults_per_actor_are_the_codes():
    from labeling.labelers.semantic import DEFAULT_BATCH_SIZE, SemanticLabelerConfig
    from labeling.pipeline.cluster import plan_layout
    from labeling.pipeline.driver import LabelingConfig

    several, one = plan_layout(cpus=64, gpus=8), plan_layout(cpus=16, gpus=1)
    default, what = settings_row("--gpus-per-actor")
    assert default.startswith(f"{several.gpus_per_actor:g} (") and f"default is {one.gpus_per_actor:g} on a one-GPU" in default
    assert settings_row("--actor-cpus")[0] == f"{several.actor_cpus:g} / {several.task_cpus:g}"
    default, what = settings_row("--model-batch-size")
    assert default == str(LabelingConfig.model_batch_size)
    assert SemanticLabelerConfig.batch_size is None
    default, what = settings_row("--semantic-batch-size")
    assert default == f"{DEFAULT_BATCH_SIZE['cuda']} ({DEFAULT_BATCH_SIZE['cpu']} on CPUs)"
