"""The publish/pull round trip over an S3 remote (dvc-s3) served by moto on 127.0.0.1.

The server is moto's real HTTP server (``ThreadedMotoServer``) started by the
test on a free local port; DVC talks to it through s3fs/aiobotocore exactly as
it would to S3. No other network is used: the endpoint is 127.0.0.1, the
credentials are dummies, instance-metadata lookups are disabled.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
from test_dvc import ck_here, dvc, env, git, make_repo, train  # noqa: F401  (env is a fixture)

import ckstore

pytest.importorskip("dvc_s3", reason="the S3 remote needs dvc-s3: pip install 'ckstore[dvc]'")
moto_server = pytest.importorskip("moto.server", reason="the local S3 server needs moto[server] (a dev dependency)")
boto3 = pytest.importorskip("boto3")
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(env, monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": env["HOME"] + "/.aws/config",
        "AWS_SHARED_CREDENTIALS_FILE": env["HOME"] + "/.aws/credentials",
    }.items():
        monkeypatch.setenv(key, value)
        env[key] = value
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpts")
        yield endpoint
    finally:
        server.stop()


def test_publish_and_pull_over_s3(tmp_path, env, s3):
    repo, _ = make_repo(tmp_path, env, remote_url="s3://ckpts/dvcstore")
    dvc("remote", "modify", "origin", "endpointurl", s3, cwd=repo, env=env)
    git("commit", "-q", "-am", "s3 endpoint", cwd=repo, env=env)
    with ckstore.Store(tmp_path / "run", metric="val_loss") as store:
        train(store)
        result = store.publish("best", name="best", repo=repo, wait=True).result()
    assert result.step == 20
    nfiles = len(os.listdir(repo / "models" / "best" / "checkpoints" / "step-00000020")) - 1  # less the manifest
    listed = boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="ckpts", Prefix="dvcstore/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert len(keys) == nfiles + 2, keys  # the tensor files, the manifest, the .dir object

    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    dvc("pull", "models/best.dvc", cwd=clone, env=env)  # the plain DVC command, over S3
    out = ck_here("verify", "models/best", "--json", cwd=clone)
    assert json.loads(out.stdout)["ok"] is True

    clone2 = tmp_path / "clone2"
    git("clone", "-q", str(repo), str(clone2), cwd=tmp_path, env=env)
    out = ck_here("pull", "models/best", "--json", cwd=clone2)  # ckstore's verified pull, over S3
    assert json.loads(out.stdout) | {"path": None} == {"ok": True, "path": None, "checked": [20], "problems": []}
