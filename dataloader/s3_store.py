"""S3-compatible object store through boto3, with our own retries under the node budget.

boto3's own retries are switched off: every attempt, first or retried, must pass the
node's `RequestBudget`, and the retry policy must treat every S3-compatible store alike
(AWS answers throttling with 503 SlowDown, SeaweedFS with 503 and a code of its own,
MinIO with 503 ServiceUnavailable). Retried: HTTP 500/502/503/504, throttling codes,
connection resets, read/connect timeouts, truncated bodies. Not retried: 404/NoSuchKey
(-> MissingObject), 403 and other client errors (-> StoreError naming the key).

Backoff is exponential with full jitter: sleep U(0, min(retry_max_s, retry_base_s * 2**n)).
Jitter uses its own RNG: it changes timing, never which data is read.

Credentials come from boto3's standard chain (environment, config files, instance role);
they are never logged: `describe()` names only bucket, prefix and endpoint.
"""
from __future__ import annotations

import random
import time

from dataloader.store import MissingObject, ObjectStore, StoreError

RETRY_STATUS = {500, 502, 503, 504}
RETRY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
               "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "TooManyRequests"}


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
                 timeout_s: float = 30.0):
        super().__init__()
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint_url, self.region = endpoint_url or None, region or None
        self.budget = budget
        self.max_retries, self.retry_base_s, self.retry_max_s = max_retries, retry_base_s, retry_max_s
        self.timeout_s = timeout_s
        self.retries = 0
        self._client = None
        self._jitter = random.Random()

    def __getstate__(self):  # a boto3 client does not cross process boundaries
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(retries={"total_max_attempts": 1}, connect_timeout=self.timeout_s,
                            read_timeout=self.timeout_s, max_pool_connections=32,
                            s3={"addressing_style": "path"})
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _retryable(self, exc: Exception) -> tuple[bool, bool]:
        """(retry?, missing?) for an exception from boto3."""
        from botocore.exceptions import (
            BotoCoreError, ClientError, ConnectionError as BotoConnectionError, ResponseStreamingError)

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = str(err.get("Code", ""))
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                return False, True
            return status in RETRY_STATUS or code in RETRY_CODES, False
        if isinstance(exc, (BotoConnectionError, ResponseStreamingError, BotoCoreError, ConnectionError,
                            TimeoutError, OSError)):
            return True, False
        return False, False

    def _call(self, what: str, key: str, fn):
        attempt = 0
        while True:
            self.requests += 1
            try:
                if self.budget is not None:
                    with self.budget.request():
                        return fn()
                return fn()
            except Exception as exc:  # classified below; anything unknown is re-raised
                retry, missing = self._retryable(exc)
                if missing:
                    raise MissingObject(f"object {key!r} is missing from {self.describe()}") from exc
                if not retry:
                    if type(exc).__module__.startswith("botocore"):
                        raise StoreError(f"{what} {key!r} on {self.describe()} failed: {exc}") from exc
                    raise
                if attempt >= self.max_retries:
                    raise StoreError(f"{what} {key!r} on {self.describe()} still failing after "
                                     f"{attempt + 1} attempts: {exc}") from exc
                self.retries += 1
                time.sleep(self._jitter.uniform(0, min(self.retry_max_s, self.retry_base_s * 2 ** attempt)))
                attempt += 1

    def get(self, key: str, byte_range: tuple[int, int] | None = None) -> bytes:
        def fetch() -> bytes:
            kwargs = {"Bucket": self.bucket, "Key": self._key(key)}
            if byte_range is not None:
                kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
            resp = self.client.get_object(**kwargs)
            body = resp["Body"].read()
            want = resp.get("ContentLength")
            if want is not None and len(body) != want:
                raise ConnectionResetError(f"body of {key!r} truncated: {len(body)} of {want} bytes")
            return body

        data = self._call("GET", key, fetch)
        if byte_range is not None and len(data) != byte_range[1] - byte_range[0]:
            raise StoreError(f"object {key!r} on {self.describe()} is shorter than its index says")
        self.bytes_read += len(data)
        return data
