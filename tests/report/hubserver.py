"""A stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub's create_repo and
upload_folder (the classic commit path, HF_HUB_DISABLE_XET=1): every file is asked to come inline
("regular" upload mode) and the commits' files are kept in memory, so a test can read back what
was pushed."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # "type/owner/name" -> {"files": {path: bytes}, "commits": int}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, body: dict | list) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(f"POST {self.path}")
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    kind = req.get("type") or "model"
                    repo = f"{req.get('organization') or 'user'}/{req['name']}"
                    hub.repos.setdefault(f"{kind}/{repo}", {"files": {}, "commits": 0})
                    prefix = "" if kind == "model" else f"{kind}s/"
                    return self._reply(200, {"url": f"{hub.url}/{prefix}{repo}", "name": repo})
                if parts[:2] == ["api", "validate-yaml"]:  # the card's front matter
                    return self._reply(200, {"errors": [], "warnings": []})
                if len(parts) < 5:
                    return self._reply(404, {"error": f"not handled: {self.path}"})
                # /api/{type}s/{owner}/{name}/preupload/{rev} and /commit/{rev}
                kind, repo, action = parts[1].rstrip("s"), "/".join(parts[2:4]), parts[4]
                key = f"{kind}/{repo}"
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if action == "commit":
                    entry = hub.repos.setdefault(key, {"files": {}, "commits": 0})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            v = item["value"]
                            entry["files"][v["path"]] = base64.b64decode(v["content"])
                    entry["commits"] += 1
                    oid = f"{entry['commits']:040d}"
                    prefix = "" if kind == "model" else f"{kind}s/"
                    url = f"{hub.url}/{prefix}{repo}/commit/{oid}"
                    return self._reply(200, {"commitUrl": url, "commitOid": oid, "success": True})
                return self._reply(404, {"error": f"not handled: {self.path}"})

            def do_GET(self):
                hub.requests.append(f"GET {self.path}")
                return self._reply(404, {"error": f"not handled: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
