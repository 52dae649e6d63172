"""`bincount status`: recorded state, a real local endpoint pinged, SageMaker lookups that fail softly."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bincount.config import load_settings
from bincount.workspace import Workspace, write_jsonl


class _Ping(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/ping" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_status_counts_data_and_pings_the_local_endpoint(tmp_path, cli):
    ws = Workspace(tmp_path)
    write_jsonl(ws.manifest, [{"id": str(i), "count": 1} for i in range(5)])
    write_jsonl(ws.split("train"), [{"id": "1", "count": 1}, {"id": "2", "count": 1}])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    ws.update_state(channels={"train": "s3://b/bincount/train/"},
                    training={"backend": "local", "job": "20250101-000000", "model_data": "/x/model.tar.gz",
                              "model_dir": "/x/model"},
                    endpoint={"backend": "local", "url": url, "pid": 1, "model_dir": "/x/model"})
    try:
        out = cli("status", "--workdir", tmp_path, "--json")
        assert out.exit_code == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown["data"] == {"manifest": 5, "train": 2, "val": None, "test": None}
        assert shown["channels"]["train"] == "s3://b/bincount/train/"
        assert shown["endpoint"]["status"] == "up" and shown["training"]["job"] == "20250101-000000"
        assert shown["tuning"] is None
        table = cli("status", "--workdir", tmp_path)
        assert table.exit_code == 0 and "up" in table.stdout
    finally:
        server.shutdown()
        server.server_close()
    shown = json.loads(cli("status", "--workdir", tmp_path, "--json").stdout)
    assert shown["endpoint"]["status"].startswith("down")


def test_status_of_vanished_sagemaker_items_is_unknown_not_an_error(tmp_path):
    from moto import mock_aws

    from bincount.status import status

    Workspace(tmp_path).update_state(
        tuning={"backend": "sagemaker", "job": "gone-tune", "objective": "val_acc", "status": "InProgress",
                "best_value": 0.5},
        training={"backend": "sagemaker", "job": "gone-job", "status": "InProgress"},
        endpoint={"backend": "sagemaker", "name": "gone-endpoint", "mode": "realtime", "model_data": "s3://b/m.tar.gz"})
    with mock_aws():
        result = status(load_settings(overrides={"workdir": tmp_path}, environ={}))
    assert result.training["status"].startswith("unknown (")
    assert result.endpoint["status"].startswith("unknown (")
    assert result.tuning["status"].startswith("unknown (") and result.tuning["best_value"] == 0.5
    assert result.data["manifest"] is None
