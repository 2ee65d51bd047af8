import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 for the module's tests (tests/s3_server.py)."""
    from s3_server import MotoServer

    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3env(s3, monkeypatch, request):
    """An environment pointed at the module's S3 server, with credentials, and its bucket (the test module's
    `BUCKET`) created; returns an s3fs filesystem of the server."""
    import s3fs
    from s3_server import CREDENTIALS

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    bucket = request.module.BUCKET
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.url}, key="testing", secret="testing")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return fs
