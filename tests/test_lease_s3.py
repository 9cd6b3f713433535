"""The one-writer lease on an object store: on a local S3 endpoint (moto's server, started here) the
lease is created with a conditional write, so a second run is refused even when its existence
check is fooled; a store without conditional writes gets one warning line."""

import socket

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")

from dataset_card.contract import layout  # noqa: E402
from dataset_card.contract.lease import Lease, LeaseHeld, _Files  # noqa: E402
from dataset_card.contract.output_folder import OutputFolder  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on a free local port, with bucket "labels"; the environment points boto,
    s3fs and pyarrow at it."""
    import boto3
    import fsspec

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": endpoint}})
    fsspec.AbstractFileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="labels")
    yield endpoint
    fsspec.AbstractFileSystem.clear_instance_cache()
    server.stop()


def _folder(uri: str) -> OutputFolder:
    import pyarrow.fs as pafs

    return OutputFolder(uri, pafs.LocalFileSystem(), uri.removeprefix("s3://"))  # the lease uses fsspec only


def test_the_lease_on_s3_is_a_conditional_write_and_refuses_a_second_run(s3_endpoint):
    messages = []
    folder = _folder("s3://labels/imagenet")
    first = Lease(folder, "run-a", log=messages.append).take()
    try:
        assert first.files.exclusive and first.files.store == "S3FileSystem"
        assert not any("cannot be created exclusively" in m for m in messages)  # no warning: it is exclusive
        with pytest.raises(LeaseHeld, match=r"labels/imagenet is being written by another run"):
            Lease(folder, "run-b", log=messages.append).take()
        # The store itself refuses the second create: with the existence check fooled, it still fails.
        files = _Files(folder)
        files.fs.exists = lambda path: False
        assert not files.create_exclusive(files.path(layout.LEASE_FILE), b"{}")
        assert b"run-a" in files.read(files.path(layout.LEASE_FILE))
    finally:
        first.release()
    second = Lease(folder, "run-b", log=messages.append).take()  # released: the next run takes it
    second.release()


def test_a_store_without_conditional_writes_warns_once(tmp_path):
    folder = OutputFolder(f"memory://{tmp_path.name}/out", None, f"/{tmp_path.name}/out")
    messages = []
    lease = Lease(folder, "run-a", log=messages.append).take()
    try:
        warnings = [m for m in messages if "cannot be created exclusively" in m]
        assert len(warnings) == 1 and "MemoryFileSystem" in warnings[0] and "start one run at a time" in warnings[0]
        with pytest.raises(LeaseHeld):
            Lease(folder, "run-b", log=messages.append).take()
    finally:
        lease.release()
