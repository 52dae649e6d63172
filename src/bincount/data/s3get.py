"""Anonymous GETs from a public S3 bucket over pooled keep-alive connections (the standard library's
http.client): the fast path of fetch and index.

botocore spends about 1 ms of CPU on every GetObject, even an unsigned one (its handler chain, endpoint
rules, a signer with nothing to sign, response parsing); this client spends about 0.15 ms, which is
what lets one Python process keep s5cmd's pace on a few cores. It answers as botocore's get_object
does for what the stages use, so their error handling is the same:

- returns {"Body": .read() / .iter_chunks(n), "ContentLength": n}; a body that ends early raises
  botocore's IncompleteReadError, a broken one ResponseStreamingError;
- raises botocore's ClientError with S3's error code (NoSuchKey, NoSuchBucket, AccessDenied, or the
  HTTP status when the body has none), EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError;
- retries connection errors, timeouts, 5xx and throttling (exponential backoff, full jitter), up to
  `attempts` tries in all as botocore's max_attempts; a kept-alive connection the server has closed is
  replaced at once without using a try;
- follows S3's redirect to the bucket's region (x-amz-bucket-region), on AWS endpoints;
- calls on_attempt(response=..., caught_exception=...) after every try, as botocore's needs-retry event.

Addressing: path style on a custom endpoint (moto, MinIO, the benchmark server), virtual-hosted on AWS
(https://<bucket>.s3.<region>.amazonaws.com). TLS verifies against botocore's CA bundle (or
$AWS_CA_BUNDLE). usable() says when this path applies: anonymous reads with no proxy for the endpoint;
everything else (credentials, proxies) stays on boto3.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote_plus, urlencode, urlsplit
from urllib.request import getproxies, proxy_bypass

RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
               "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException"}
MAX_ERROR_BODY = 64 * 1024
_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,2000})</Message>")
_BOTO_ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT",
                       "AWS_S3_USE_ARN_REGION", "AWS_S3_US_EAST_1_REGIONAL_ENDPOINT")  # endpoint rules botocore owns
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def usable(endpoint_url: str | None, unsigned: bool) -> bool:
    """True when reads can take this path: anonymous, and no proxy applies to the endpoint."""
    if not unsigned or (not endpoint_url and any(os.environ.get(v, "").strip() for v in _BOTO_ENDPOINT_VARS)):
        return False
    host = urlsplit(endpoint_url).hostname if endpoint_url else "s3.amazonaws.com"
    scheme = urlsplit(endpoint_url).scheme if endpoint_url else "https"
    proxies = getproxies()
    return not (proxies.get(scheme) or proxies.get("all")) or bool(proxy_bypass(host or ""))


class PublicBucket:
    """GET objects of one bucket anonymously; thread-safe, one pool of up to `connections` idle connections."""

    def __init__(self, bucket: str, *, endpoint_url: str | None, region: str, connections: int = 32,
                 connect_timeout: float = 5.0, read_timeout: float = 10.0, attempts: int = 8,
                 on_attempt: Callable[..., Any] | None = None, user_agent: str = "bincount"):
        self.bucket, self.custom = bucket, bool(endpoint_url)
        self.connections, self.attempts = connections, max(1, attempts)
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.on_attempt = on_attempt
        self.headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
        self._idle: deque[http.client.HTTPConnection] = deque()
        self._context: ssl.SSLContext | None = None
        self._endpoint(endpoint_url, region)

    # -- where requests go ----------------------------------------------------------------------
    def _endpoint(self, endpoint_url: str | None, region: str) -> None:
        self.region = region
        if endpoint_url:
            url = urlsplit(endpoint_url)
            base = url.path.rstrip("/")
            self.scheme, self.host, self.port = url.scheme, url.hostname or "", url.port
            self.prefix = f"{base}/{quote(self.bucket, safe='')}/"
        else:
            suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
            self.scheme, self.port = "https", None
            if "." in self.bucket or self.bucket.lower() != self.bucket:  # not DNS-safe: path style
                self.host, self.prefix = f"s3.{region}.{suffix}", f"/{quote(self.bucket, safe='')}/"
            else:
                self.host, self.prefix = f"{self.bucket}.s3.{region}.{suffix}", "/"
        self.endpoint_url = f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port else "")
        self._close_idle()

    def _connection(self) -> http.client.HTTPConnection:
        try:
            return self._idle.pop()
        except IndexError:
            pass
        if self.scheme == "https":
            if self._context is None:
                from botocore.httpsession import get_cert_path

                self._context = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.connect_timeout, context=self._context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)

    def _release(self, conn: http.client.HTTPConnection) -> None:
        """Keep an open connection for the next request, unless the pool is full or it goes to a host left
        behind by a redirect (it was in flight while another thread followed one)."""
        if conn.sock is not None and conn.host == self.host and len(self._idle) < self.connections:
            self._idle.append(conn)
        else:
            conn.close()

    def _close_idle(self) -> None:
        while self._idle:
            try:
                self._idle.pop().close()
            except IndexError:
                break

    def close(self) -> None:
        self._close_idle()

    # -- requests ---------------------------------------------------------------------------------
    def get_object(self, Bucket: str, Key: str, **_: Any) -> dict:  # noqa: N803 - botocore's parameter names
        """The object's body and length (see the module docstring for errors and retries)."""
        conn, resp = self._request("GetObject", {"Bucket": Bucket, "Key": Key}, lambda: self.prefix + quote(Key, safe="/~"))
        length = resp.getheader("Content-Length")
        size = int(length) if length is not None else None
        return {"Body": _Body(self, conn, resp, size), "ContentLength": size, "ETag": resp.getheader("ETag")}

    def list_objects(self, prefix: str) -> Iterator[list[tuple[str, int]]]:
        """ListObjectsV2 of every key under `prefix`: one list of (key, bytes) per page of up to 1,000."""
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
            if token:
                query["continuation-token"] = token
            target = lambda: (self.prefix.rstrip("/") or "/") + "?" + urlencode(query, quote_via=quote)  # noqa: E731
            conn, resp = self._request("ListObjectsV2", {"Bucket": self.bucket, "Prefix": prefix}, target)
            length = resp.getheader("Content-Length")
            page, token = _parse_listing(_Body(self, conn, resp, int(length) if length is not None else None).read())
            yield page
            if token is None:
                return

    def _request(self, operation: str, params: dict, target: Callable[[], str]) -> tuple[Any, Any]:
        """A 200 answer to GET target() (called again after a redirect), with retries; else botocore's errors."""
        redirected = False
        attempt = 0
        while True:
            attempt += 1
            try:
                conn, resp = self._send(target())
            except Exception as exc:  # a botocore connection error: retry, or give up
                self._attempted(operation, None, None, exc)
                if attempt >= self.attempts:
                    raise
                self._backoff(attempt)
                continue
            if resp.status == 200:
                self._attempted(operation, 200, {}, None)
                return conn, resp
            code, message, region = self._error(conn, resp)
            parsed = {"Error": {"Code": code, "Message": message, **params},
                      "ResponseMetadata": {"HTTPStatusCode": resp.status}}
            if region and not redirected and not self.custom and region != self.region:
                self._endpoint(None, region)  # S3's redirect to the bucket's region: once, not a try
                redirected, attempt = True, attempt - 1
                continue
            self._attempted(operation, resp.status, parsed, None)
            if (resp.status >= 500 or resp.status == 429 or code in RETRY_CODES) and attempt < self.attempts:
                self._backoff(attempt)
                continue
            from botocore.exceptions import ClientError

            raise ClientError(parsed, operation)

    def _send(self, path: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One request on a pooled connection; a reused one the server closed is replaced once."""
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        for fresh_try in (False, True):
            conn = self._connection() if not fresh_try else self._connection_new()
            reused = conn.sock is not None
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.settimeout(self.read_timeout)
            except TimeoutError:
                conn.close()
                raise ConnectTimeoutError(endpoint_url=self.endpoint_url) from None
            except OSError as exc:
                conn.close()
                raise EndpointConnectionError(endpoint_url=self.endpoint_url, error=exc) from None
            try:
                conn.request("GET", path, headers=self.headers)
                return conn, conn.getresponse()
            except TimeoutError:
                conn.close()
                raise ReadTimeoutError(endpoint_url=self.endpoint_url, error="timed out") from None
            except _STALE:
                conn.close()
                if reused and not fresh_try:
                    continue  # kept alive too long: the server had closed it
                raise ConnectionClosedError(endpoint_url=self.endpoint_url) from None
            except (OSError, http.client.HTTPException):
                conn.close()
                raise ConnectionClosedError(endpoint_url=self.endpoint_url) from None
        raise AssertionError("unreachable")

    def _connection_new(self) -> http.client.HTTPConnection:
        self._close_idle()  # the others are as old as the one that failed
        return self._connection()

    def _error(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> tuple[str, str, str | None]:
        """(code, message, the bucket's region if S3 named another) of an error answer; releases the connection."""
        try:
            body = resp.read(MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            body = b""
        if resp.isclosed():
            self._release(conn)
        else:
            conn.close()  # an error body larger than we read: do not reuse
        found = _CODE.search(body)
        code = found.group(1).decode(errors="replace") if found else str(resp.status)
        found = _MESSAGE.search(body)
        message = found.group(1).decode(errors="replace") if found else resp.reason
        region = resp.getheader("x-amz-bucket-region") if resp.status in (301, 307, 400) else None
        return code, message, region

    def _attempted(self, operation: str, status: int | None, parsed: dict, exc: BaseException | None) -> None:
        """on_attempt as botocore's needs-retry event calls it: response=(http response, parsed) or None."""
        if self.on_attempt is not None:
            response = None if status is None else (_Status(status), parsed)
            self.on_attempt(response=response, caught_exception=exc, operation=_Status(0, operation))

    @staticmethod
    def _backoff(attempt: int) -> None:
        time.sleep(random.uniform(0, min(20.0, 0.05 * 2 ** attempt)))


class _Status:
    """What on_attempt reads of an answer and an operation (botocore's AWSResponse.status_code, OperationModel.name)."""

    def __init__(self, status_code: int, name: str = ""):
        self.status_code, self.name = status_code, name


def _parse_listing(body: bytes) -> tuple[list[tuple[str, int]], str | None]:
    """(key, bytes) of a ListObjectsV2 page (keys URL-encoded, as asked) and the next continuation token."""
    from xml.etree import ElementTree

    from botocore.parsers import ResponseParserError

    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise ResponseParserError(f"unable to parse the ListObjectsV2 answer: {exc}") from None
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    page = [(unquote_plus(c.findtext(f"{ns}Key") or ""), int(c.findtext(f"{ns}Size") or 0))
            for c in root.iter(f"{ns}Contents")]
    token = root.findtext(f"{ns}NextContinuationToken") if root.findtext(f"{ns}IsTruncated") == "true" else None
    return page, token or None


class _Body:
    """A 200 answer's body, read once: .read() or .iter_chunks(n); the connection goes back to the pool
    only after the whole body arrived, else it is closed."""

    def __init__(self, owner: PublicBucket, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 length: int | None):
        self.owner, self.conn, self.resp, self.length = owner, conn, resp, length

    def read(self) -> bytes:
        return b"".join(self.iter_chunks(1 << 20))

    def iter_chunks(self, size: int = 256 * 1024) -> Iterator[bytes]:
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        got, done = 0, False
        try:
            while True:
                try:
                    chunk = self.resp.read(size)
                except TimeoutError:
                    raise ReadTimeoutError(endpoint_url=self.owner.endpoint_url, error="timed out") from None
                except (OSError, http.client.HTTPException) as exc:
                    raise ResponseStreamingError(error=exc) from None
                if not chunk:
                    break
                got += len(chunk)
                yield chunk
            if self.length is not None and got != self.length:
                raise IncompleteReadError(actual_bytes=got, expected_bytes=self.length)
            done = True
        finally:
            if done and self.resp.isclosed():
                self.owner._release(self.conn)
            else:
                self.conn.close()

    def close(self) -> None:
        self.conn.close()

