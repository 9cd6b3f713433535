import os
import tempfile

# Tests never touch the network: `datasets` and `huggingface_hub` must work from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# `datasets` reads its cache location once, at import: point it at a fresh folder for this session
# so no run reads splits another left behind (tests that rewrite a folder pass their own cache_dir).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="c2fmae-test-datasets-"))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small-tensor tests: on a busy 2-core machine two spinning
    threads run them several times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting Ray takes seconds): 2 CPUs, a small object store.

    Its workers import this checkout (PYTHONPATH), not an installed copy.
    """
    import ray

    if not ray.is_initialized():
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    ray.shutdown()


@pytest.fixture
def nan_at_third_instance_loss(monkeypatch):
    """Patch the trainer so its model's instance loss turns NaN at the third call (optimizer step 3 when
    only the training forward calls it); `monkeypatch.undo()` removes the cause."""
    import pretraining.training.trainer as trainer_module

    build_model = trainer_module.build_model

    def poisoned(config):
        model = build_model(config)
        calls = {"n": 0}
        original = model.loss_term

        def loss_term(modality, *args):
            calls["n"] += modality == "instance"
            value = original(modality, *args)
            return value * float("nan") if modality == "instance" and calls["n"] == 3 else value

        model.loss_term = loss_term
        return model

    monkeypatch.setattr(trainer_module, "build_model", poisoned)
