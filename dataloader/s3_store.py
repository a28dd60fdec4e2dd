"""S3-compatible object store through botocore (boto3's core, from the [s3] extra), with our
own retries under the node budget.

botocore's own retries are switched off: every attempt, first or retried, must pass the
node's `RequestBudget`, and the retry policy must treat every S3-compatible store alike
(AWS answers throttling with 503 SlowDown, SeaweedFS with 503 and a code of its own,
MinIO with 503 ServiceUnavailable).

    retried (each retry logged with its reason)   refused at once (retrying cannot help)
    ───────────────────────────────────────────   ─────────────────────────────────────────
    HTTP 500/502/503/504, throttling codes         no credentials found, rejected credentials
    connection resets, closed connections          (InvalidAccessKeyId, SignatureDoesNotMatch,
    read/connect timeouts, truncated bodies        expired tokens, 403 AccessDenied)
                                                   unknown bucket, connection refused, TLS
                                                   errors, any other client error
    404 / NoSuchKey -> MissingObject (the bad-data policy decides)

Backoff is exponential with full jitter: sleep U(0, min(retry_max_s, retry_base_s * 2**n)).
Jitter uses its own RNG: it changes timing, never which data is read. No retry starts
once `retry_deadline_s` have passed since the first attempt, so an endpoint that accepts
connections and never answers fails after about retry_deadline_s + timeout_s (with the
defaults, 60 + 20 s) instead of (max_retries + 1) x timeout_s.

Credentials come from the standard AWS chain (environment, config files, instance role);
they are never logged: `describe()` names only bucket, prefix and endpoint, and retry
reasons carry the error code and message S3 sent, which name no key.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time

from dataloader.store import MissingObject, ObjectStore, StoreError

log = logging.getLogger(__name__)

RETRY_STATUS = {500, 502, 503, 504}
RETRY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
               "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "TooManyRequests"}
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
CREDENTIAL_HINT = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and its "
                   "config files) for this endpoint")


class _NotModified(Exception):
    """A conditional GET found the cached copy current (HTTP 304)."""


def _caused_by(exc: BaseException, kind: type) -> bool:
    """Whether `kind` is somewhere in exc's chain (botocore keeps the cause in kwargs)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = (getattr(exc, "kwargs", {}) or {}).get("error") or exc.__cause__ or exc.__context__
    return False


_session_lock = threading.Lock()
_sessions: dict[tuple[int, str], object] = {}


def _session():
    """This process's botocore session for the current AWS_* environment (call under
    _session_lock: sessions are not thread-safe).

    A new session per client parses the S3 service model and endpoint rules again (JSON
    of some MB): 0.2-0.6 s per client here, up to 1.6 s on a loaded machine, which was most
    of a warm loader's time to its first sample. A shared session makes a client in
    ~0.01 s. Keyed by pid (a forked child builds its own; clients never cross processes
    either) and by a digest of the AWS_* variables, so a changed environment (another
    profile, other keys) takes effect for the next store. Known limit: the session keeps
    the credentials it resolved (botocore refreshes temporary ones itself); credential or
    config files rewritten while the process runs are read by new processes only.
    botocore alone, not boto3: boto3's import adds s3transfer (~0.3 s) that we never use."""
    env = hashlib.sha256(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
                         .encode()).hexdigest()
    key = (os.getpid(), env)
    session = _sessions.get(key)
    if session is None:
        import botocore.session

        _sessions.clear()  # other processes' or environments' sessions are never used again
        session = _sessions[key] = botocore.session.get_session()
    return session


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise StoreError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise StoreError(f"{uri!r} names no bucket")
    return bucket, prefix.strip("/")


class S3Store(ObjectStore):
    def __init__(self, uri: str, *, endpoint_url: str = "", region: str = "", budget=None,
                 max_retries: int = 8, retry_base_s: float = 0.05, retry_max_s: float = 2.0,
                 timeout_s: float = 20.0, retry_deadline_s: float = 60.0):
        super().__init__()
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint_url, self.region = endpoint_url or None, region or None
        self.budget = budget
        self.max_retries, self.retry_base_s, self.retry_max_s = max_retries, retry_base_s, retry_max_s
        self.timeout_s, self.retry_deadline_s = timeout_s, retry_deadline_s
        self.retries = 0
        self._client = None
        self._client_pid = 0
        self._jitter = random.Random()

    def __getstate__(self):  # a client does not cross process boundaries
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        # made in the process that uses it: a forked child never reuses its parent's client,
        # whose keep-alive sockets the parent (or another child) may be using or closing
        with _session_lock:  # prefetch threads may ask at once; one client per store
            if self._client is None or self._client_pid != os.getpid():
                from botocore.config import Config

                config = Config(retries={"total_max_attempts": 1}, connect_timeout=self.timeout_s,
                                read_timeout=self.timeout_s, max_pool_connections=32,
                                s3={"addressing_style": "path"})
                self._client = _session().create_client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
                self._client_pid = os.getpid()
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _classify(self, exc: Exception, what: str, key: str) -> str:
        """The reason to retry `exc` (for the log); raises what cannot succeed by retrying."""
        from botocore.exceptions import (
            BotoCoreError, ClientError, ConnectionError as BotoConnectionError, HTTPClientError,
            IncompleteReadError, NoCredentialsError, PartialCredentialsError, SSLError)

        where = f"{what} {key!r} on {self.describe()}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = str(err.get("Code", ""))
            if code == "NoSuchBucket":
                raise StoreError(f"{where}: bucket {self.bucket!r} does not exist there; check "
                                 "data.uri and data.s3_endpoint_url") from exc
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                raise MissingObject(f"object {key!r} is missing from {self.describe()}") from exc
            if code in CREDENTIAL_CODES:
                raise StoreError(f"{where}: S3 refused the credentials ({code}); "
                                 f"{CREDENTIAL_HINT}") from exc
            if status == 403 or code == "AccessDenied":
                raise StoreError(f"{where}: access denied ({code or status}): these credentials "
                                 f"may not read this bucket; {CREDENTIAL_HINT}") from exc
            if status in RETRY_STATUS or code in RETRY_CODES:
                return f"HTTP {status} {code}".strip()
            raise StoreError(f"{where} failed: {exc}") from exc
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            raise StoreError(f"{where}: no usable S3 credentials ({exc}); {CREDENTIAL_HINT}"
                             ) from exc
        if isinstance(exc, SSLError):
            raise StoreError(f"{where}: TLS failed ({exc}); check data.s3_endpoint_url") from exc
        if _caused_by(exc, ConnectionRefusedError):
            raise StoreError(f"{where}: connection refused by {self.endpoint_url or 'the endpoint'}"
                             "; is the server running? check data.s3_endpoint_url") from exc
        if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError,
                            ConnectionError, TimeoutError)):
            return f"{type(exc).__name__}: {exc}"
        if isinstance(exc, BotoCoreError):
            raise StoreError(f"{where} failed: {exc}") from exc
        raise exc

    def _call(self, what: str, key: str, fn):
        self.client  # built before the clock starts (the first client of a process takes a while)
        attempt, first = 0, time.monotonic()
        while True:
            self.requests += 1
            try:
                if self.budget is not None:
                    with self.budget.request():
                        return fn()
                return fn()
            except _NotModified:
                raise
            except Exception as exc:  # classified: refused at once, or a reason to retry
                reason = self._classify(exc, what, key)
                delay = self._jitter.uniform(0, min(self.retry_max_s, self.retry_base_s * 2 ** attempt))
                elapsed = time.monotonic() - first
                if attempt >= self.max_retries or elapsed + delay > self.retry_deadline_s:
                    raise StoreError(
                        f"{what} {key!r} on {self.describe()} still failing after {attempt + 1} "
                        f"attempts in {elapsed:.0f} s (data.max_retries={self.max_retries}, "
                        f"data.retry_deadline_s={self.retry_deadline_s:g}): {reason}") from exc
                log.warning("S3 %s %r on %s: %s; retry %d of at most %d in %.2f s", what, key,
                            self.describe(), reason, attempt + 1, self.max_retries, delay)
                self.retries += 1
                time.sleep(delay)
                attempt += 1

    def get_fresh(self, key: str, etag: str | None) -> tuple[bytes | None, str | None]:
        """A conditional GET: (None, etag) if the object still has `etag`, else (bytes, its
        ETag). Signed like any request, so it also proves the credentials."""
        from botocore.exceptions import ClientError

        def fetch():
            try:
                return self._get_object(key, IfNoneMatch=etag) if etag else self._get_object(key)
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 304:
                    raise _NotModified() from None
                raise

        try:
            data, new_etag = self._call("GET", key, fetch)
        except _NotModified:
            return None, etag
        self.bytes_read += len(data)
        return data, new_etag

    def _get_object(self, key: str, **kwargs) -> tuple[bytes, str | None]:
        """One GET: (body, ETag); a body shorter than announced counts as a reset."""
        resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)
        body = resp["Body"].read()
        want = resp.get("ContentLength")
        if want is not None and len(body) != want:
            raise ConnectionResetError(f"body of {key!r} truncated: {len(body)} of {want} bytes")
        return body, resp.get("ETag")

    def get(self, key: str, byte_range: tuple[int, int] | None = None) -> bytes:
        kwargs = {} if byte_range is None else {"Range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"}
        data = self._call("GET", key, lambda: self._get_object(key, **kwargs)[0])
        if byte_range is not None and len(data) != byte_range[1] - byte_range[0]:
            raise StoreError(f"object {key!r} on {self.describe()} is shorter than its index says")
        self.bytes_read += len(data)
        return data
