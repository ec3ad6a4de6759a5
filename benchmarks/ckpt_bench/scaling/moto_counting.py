"""A ``moto`` S3 server that counts the requests it serves (run as a script: ``python
moto_counting.py PORT``): moto's own WSGI app behind a middleware that tallies each request by
kind, ``LIST`` (a bucket listing), ``HEAD``, ``GET`` (an object), ``PUT``, ``POST``, ``DELETE``.

``GET /__requests__`` answers the tallies as JSON and ``POST /__requests__`` zeroes them (the
name cannot be a bucket, so it never shadows S3). The client under test is unchanged: counting at
the server sees every request it really sends, retries included.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from urllib.parse import parse_qs

COUNT_PATH = "/__requests__"


class Counting:
    """WSGI middleware: count each request by kind, then hand it to ``app``."""

    def __init__(self, app) -> None:
        self.app = app
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        if path == COUNT_PATH:
            with self.lock:
                body = json.dumps(dict(self.counts)).encode()
                if method == "POST":
                    self.counts.clear()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        parts = [p for p in path.split("/") if p]
        kind = "LIST" if method == "GET" and (len(parts) <= 1 or "list-type" in query) else method
        with self.lock:
            self.counts[kind] += 1
        return self.app(environ, start_response)


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    port = int(sys.argv[1])
    app = Counting(DomainDispatcherApplication(create_backend_app))
    make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


if __name__ == "__main__":
    main()
