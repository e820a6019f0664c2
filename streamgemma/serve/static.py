"""The web page `streamgemma serve` shows at `/` (docs/browser.md): a few
static files shipped in the package (streamgemma/serve/web), answered from
the websocket server's `process_request` hook.

Only the files found there at start-up are served, looked up by exact name
(no path is ever joined from a request, so nothing outside can be reached),
each with its content type and headers that forbid everything the page does
not need: its own scripts, styles and images, and connections back to this
server only.
"""

from __future__ import annotations

import email.utils
from http import HTTPStatus
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Response

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# No inline script or style, no other origin, no framing, no form posts, no <base>.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Files change with the package: a browser revalidates instead of keeping an old page.
    "Cache-Control": "no-cache",
}


class WebPage:
    """The page's files, read once from the package: `response(path)` is
    the HTTP response for a request path, or None when it names no file."""

    def __init__(self, package: str = "streamgemma.serve", folder: str = "web"):
        self.files: dict[str, tuple[bytes, str]] = {}
        root = resources.files(package).joinpath(folder)
        for entry in root.iterdir():
            suffix = "." + entry.name.rpartition(".")[2]
            if entry.is_file() and suffix in CONTENT_TYPES and not entry.name.startswith("."):
                self.files["/" + entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
        if "/index.html" not in self.files:
            raise FileNotFoundError(f"the web page is missing from the package ({package}/{folder}/index.html)")
        self.files["/"] = self.files["/index.html"]

    def response(self, path: str) -> Response | None:
        found = self.files.get(path.split("?", 1)[0].split("#", 1)[0])
        if found is None:
            return None
        body, content_type = found
        headers = Headers({"Date": email.utils.formatdate(usegmt=True), "Connection": "close",
                           "Content-Length": str(len(body)), "Content-Type": content_type, **SECURITY_HEADERS})
        return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers, body)
