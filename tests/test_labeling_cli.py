"""First contact with `labeling/run.py`, in process (fast): the examples `--help` prints run as
written, and `--models default` without the SAM weights names the flag that takes them."""

import shlex

import pytest

from labeling.labelers.model_choice import ModelChoice, ModelLoadError
from labeling.run import parser


def test_every_example_in_help_names_the_required_models_and_parses():
    lines = [line.strip() for line in parser().format_help().splitlines() if "labeling/run.py --input" in line]
    assert len(lines) >= 3
    for line in lines:
        command = line[line.index("labeling/run.py"):].split("#")[0]
        assert "--models" in command, line
        if "..." not in command:  # the ray job line elides its input
            parser().parse_args(shlex.split(command)[1:])


def test_default_models_offline_name_the_checkpoint_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        ModelChoice("default").pinned()
    message = str(err.value)
    assert "--sam-checkpoint" in message and "sam_vit_h_4b8939.pth" in message and "\n" not in message
