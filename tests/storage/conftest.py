"""A real S3-compatible server (moto in server mode) on loopback for the s3:// tests.

The server is one subprocess for the session; each test gets its own bucket and the standard AWS
variables (endpoint, keys, region) in its environment, which is all raylm reads: pyarrow's S3
filesystem, boto3 and the Ray workers (the data pipeline forwards them) take it from there.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from cluster.local_cluster import free_port


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]

    def bucket(self) -> str:
        """A new, empty bucket."""
        import boto3

        name = f"raylm-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Copy every file of `folder` to s3://bucket/prefix/; returns that URI."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")
        return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def s3_server():
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(endpoint, timeout=2)
            break
        except requests.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        yield S3(endpoint, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    """The server, with its AWS variables set for this test only."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
