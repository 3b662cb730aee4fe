"""The coordinator's public port: a fleet-only reverse proxy in front of the SuperLink.

Flower 1.41's SuperLink serves the Fleet API (SuperNodes), the Control API (start / stop runs,
register keys, read logs: no login) and the Runtime API (its ServerApp) on one port.
``medgen-server start`` runs the SuperLink on ``127.0.0.1`` only and puts this proxy on the public
``--address/--port``: it terminates TLS with the server certificate and forwards, over loopback
TLS, only ``POST /v1/fleet/<name>`` and ``GET|HEAD /health``; every other request gets 404 and
never reaches the SuperLink. Headers (SuperNode authentication signs its requests in them) and
bodies (weights travel as objects) pass unchanged, streamed both ways.

    python -m medgen.deployment.proxy --listen HOST:PORT --upstream 127.0.0.1:PORT \\
        [--cert server.pem --key server.key --ca ca.pem | --insecure]

``deploy/nginx-fleet-only.conf`` states the same rule for a production nginx.
"""

from __future__ import annotations

import argparse
import re
import ssl

import httpx

FLEET = re.compile(r"^/v1/fleet/[a-z][a-z-]{0,63}$")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "host"}


def allowed(method: str, raw_path: bytes) -> bool:
    """Only the Fleet API's calls and the health check; the raw path, so that no percent-encoding
    or dot segment can be decoded into another API's path further on."""
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return False
    if method == "POST" and FLEET.match(path):
        return True
    return method in ("GET", "HEAD") and path == "/health"


class FleetProxy:
    """An ASGI app forwarding allowed requests to ``upstream`` (a base URL)."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool, timeout_s: float = 600.0):
        self.upstream, self.verify, self.timeout_s = upstream, verify, timeout_s
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(base_url=self.upstream, verify=self.verify,
                                                timeout=httpx.Timeout(self.timeout_s, connect=10.0))
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        method, raw_path = scope["method"], scope.get("raw_path") or scope["path"].encode()
        if not allowed(method, raw_path) or scope.get("query_string"):
            await _answer(send, 404, b"not found\n")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP]

        async def body():
            while True:
                event = await receive()
                if event["type"] == "http.disconnect":
                    return
                if event.get("body"):
                    yield event["body"]
                if not event.get("more_body"):
                    return

        request = self.client.build_request(method, raw_path.decode("ascii"), headers=headers,
                                            content=body() if method == "POST" else None)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            await _answer(send, 502, f"the SuperLink is not reachable ({type(e).__name__})\n".encode())
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw
                                    if k.decode("latin-1").lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _answer(send, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="public HOST:PORT")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    parser.add_argument("--cert", help="server certificate (PEM)")
    parser.add_argument("--key", help="server private key (PEM)")
    parser.add_argument("--ca", help="CA certificate that signed the SuperLink's certificate")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides")
    args = parser.parse_args(argv)
    if not args.insecure and not (args.cert and args.key and args.ca):
        parser.error("--cert, --key and --ca are needed (or --insecure)")
    verify = False if args.insecure else ssl.create_default_context(cafile=args.ca)
    upstream = f"{'http' if args.insecure else 'https'}://{args.upstream}"
    host, port = _split(args.listen)
    tls = {} if args.insecure else {"ssl_certfile": args.cert, "ssl_keyfile": args.key}
    uvicorn.run(FleetProxy(upstream, verify), host=host, port=port, log_level="warning", access_log=False,
                lifespan="on", server_header=False, date_header=False, timeout_keep_alive=30, **tls)


if __name__ == "__main__":
    main()
