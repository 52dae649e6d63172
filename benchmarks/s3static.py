"""A cheap S3-compatible static server for benchmarks: objects from memory, a fixed delay per request.

Serves one public bucket over HTTP/1.1 with keep-alive (path-style addressing, as clients use for an
IP endpoint): GET and HEAD of an object (with `Range: bytes=a-b`, which s5cmd's downloader sends) and
ListObjectsV2 (prefix, max-keys, continuation-token), HeadBucket and GetBucketLocation (us-east-1). Anything else is a 405 or an S3 XML error. Every
request waits `latency` seconds before its answer (S3's first-byte latency; AWS quotes tens of ms for
small objects). A thread per connection and no signatures checked, so it spends little CPU and the
client is what a benchmark measures. Run it in a child process (its own GIL and CPU accounting):

    python benchmarks/s3static.py --root DIR --bucket NAME --port 0 --latency-ms 20
    (prints "ready PORT"; serves DIR's files as keys until stdin closes, then prints its CPU seconds)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape


class Store:
    """Objects of one bucket in memory: key -> (body, etag), keys sorted for listing."""

    def __init__(self, bucket: str, objects: dict[str, bytes]):
        self.bucket = bucket
        self.objects = {k: (v, hashlib.md5(v).hexdigest()) for k, v in objects.items()}
        self.keys = sorted(self.objects)
        self.modified = formatdate(usegmt=True)

    @classmethod
    def from_folder(cls, bucket: str, root: Path) -> "Store":
        files = (p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("."))
        return cls(bucket, {p.relative_to(root).as_posix(): p.read_bytes() for p in files})


def make_handler(store: Store, latency: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections, as with S3
        # TCP_NODELAY: the headers and the body are two writes; with Nagle's algorithm the body waited for
        # the client's delayed ACK of the headers, 40 ms per request on a reused connection.
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:  # no line per request
            pass

        def do_HEAD(self) -> None:
            self.serve(body=False)

        def do_GET(self) -> None:
            self.serve(body=True)

        def do_PUT(self) -> None:
            self.error(405, "MethodNotAllowed", "this benchmark server is read-only")

        do_POST = do_DELETE = do_PUT

        def serve(self, body: bool) -> None:
            time.sleep(latency)
            url = urlsplit(self.path)
            bucket, _, key = unquote(url.path).lstrip("/").partition("/")
            if bucket != store.bucket:
                return self.error(404, "NoSuchBucket", f"no bucket {bucket!r}")
            if not key:
                query = parse_qs(url.query, keep_blank_values=True)
                if "location" in query:  # GetBucketLocation; HeadBucket below: the region, as s5cmd asks
                    xml = ('<?xml version="1.0" encoding="UTF-8"?><LocationConstraint '
                           'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></LocationConstraint>')
                    return self.reply(200, xml.encode(), {"Content-Type": "application/xml"}, body)
                if not body:
                    return self.reply(200, b"", {"x-amz-bucket-region": "us-east-1"}, body)
                return self.list_objects(query, body)
            found = store.objects.get(key)
            if found is None:
                return self.error(404, "NoSuchKey", "The specified key does not exist.", body)
            data, etag = found
            status, headers = 200, {}
            byte_range = self.headers.get("Range")
            if byte_range and byte_range.startswith("bytes="):
                first, _, last = byte_range[6:].partition("-")
                start = int(first) if first else max(0, len(data) - int(last))
                end = min(len(data) - 1, int(last)) if first and last else len(data) - 1
                if start >= len(data):
                    return self.error(416, "InvalidRange", "The requested range is not satisfiable", body)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
            self.reply(status, data, {"ETag": f'"{etag}"', "Last-Modified": store.modified,
                                      "Accept-Ranges": "bytes", "Content-Type": "binary/octet-stream", **headers},
                       body)

        def list_objects(self, query: dict, body: bool) -> None:
            if query.get("list-type", [""])[0] != "2":
                return self.error(400, "InvalidRequest", "only ListObjectsV2 (list-type=2) is served", body)
            prefix = query.get("prefix", [""])[0]
            max_keys = int(query.get("max-keys", ["1000"])[0])
            after = query.get("continuation-token", query.get("start-after", [""]))[0]
            keys = [k for k in store.keys if k.startswith(prefix) and k > after]
            page, more = keys[:max_keys], len(keys) > max_keys
            contents = "".join(
                f"<Contents><Key>{escape(k)}</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified>"
                f"<ETag>&quot;{store.objects[k][1]}&quot;</ETag><Size>{len(store.objects[k][0])}</Size>"
                f"<StorageClass>STANDARD</StorageClass></Contents>" for k in page)
            token = f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>" if more else ""
            xml = ('<?xml version="1.0" encoding="UTF-8"?>'
                   '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                   f"<Name>{escape(store.bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
                   f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{str(more).lower()}</IsTruncated>{token}{contents}"
                   "</ListBucketResult>")
            self.reply(200, xml.encode(), {"Content-Type": "application/xml"}, body)

        def error(self, status: int, code: str, message: str, body: bool = True) -> None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                   f"<Message>{escape(message)}</Message><Resource>{escape(quote(self.path))}</Resource></Error>")
            self.reply(status, xml.encode(), {"Content-Type": "application/xml"}, body)

        def reply(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-amz-request-id", "0")
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of connections open at once


class S3StaticServer:
    """The server on 127.0.0.1 in a background thread of this process: `with S3StaticServer(store) as url:`."""

    def __init__(self, store: Store, latency_ms: float = 0.0, port: int = 0):
        self.httpd = _Server(("127.0.0.1", port), make_handler(store, latency_ms / 1000))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="folder whose files become the bucket's keys")
    p.add_argument("--bucket", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    server = S3StaticServer(Store.from_folder(args.bucket, args.root), args.latency_ms, args.port)
    with server as url:
        print(f"ready {url}", flush=True)
        sys.stdin.read()
    print(f"{time.process_time():.2f}", flush=True)  # the server's CPU seconds


if __name__ == "__main__":
    main(sys.argv[1:])
