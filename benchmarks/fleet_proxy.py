"""The fleet-only proxy's cost: the same requests straight to a loopback HTTPS server and through
``medgen/deployment/proxy.py`` in front of it, in one run.

The upstream is a small uvicorn app with the server certificate that answers like the Fleet API
does in size: ``POST /v1/fleet/push-object`` reads the whole body (an upload of one 5 MB object,
Flower's largest chunk), ``POST /v1/fleet/pull-object`` answers 5 MB (a download), ``GET /health``
answers nothing (a SuperNode's poll-sized request). Each kind is timed ``--repeat`` times on one
kept-alive client, direct and proxied alternately, both over TLS; the ratio is proxied / direct.

Usage: python benchmarks/fleet_proxy.py [--repeat 40] [--out benchmarks/results/fleet_proxy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from medgen.deployment.certs import init_ca
from medgen.deployment.link import wait_healthy
from medgen.deployment.procs import Child, free_port

OBJECT = 5 * 1024 * 1024

UPSTREAM = """
import sys
import uvicorn

OBJECT = 5 * 1024 * 1024


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    size = 0
    while True:
        event = await receive()
        size += len(event.get("body", b""))
        if not event.get("more_body"):
            break
    body = b"\\0" * OBJECT if scope["path"].endswith("pull-object") else str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_certfile=sys.argv[2], ssl_keyfile=sys.argv[3],
            log_level="warning")
"""


def timed(client: httpx.Client, base: str, kind: str) -> float:
    t0 = time.perf_counter()
    if kind == "health":
        r = client.get(f"{base}/health")
    elif kind == "upload":
        r = client.post(f"{base}/v1/fleet/push-object", content=b"\1" * OBJECT)
        assert int(r.text) == OBJECT
    else:
        r = client.post(f"{base}/v1/fleet/pull-object", content=b"")
        assert len(r.content) == OBJECT
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet_proxy.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medgen-bench-proxy-"))
    certs = init_ca(work / "certs")
    up_port, proxy_port = free_port(), free_port()
    upstream = Child("upstream", [sys.executable, "-c", UPSTREAM, str(up_port), str(certs["cert"]), str(certs["key"])],
                     work / "upstream.log")
    proxy = Child("proxy", [sys.executable, "-m", "medgen.deployment.proxy", "--listen", f"127.0.0.1:{proxy_port}",
                            "--upstream", f"127.0.0.1:{up_port}", "--cert", str(certs["cert"]),
                            "--key", str(certs["key"]), "--ca", str(certs["ca"])], work / "proxy.log")
    try:
        for child, port in ((upstream, up_port), (proxy, proxy_port)):
            wait_healthy(f"localhost:{port}", certs["ca"], 60, child)
        verify = ssl.create_default_context(cafile=str(certs["ca"]))
        times = {kind: {"direct": [], "proxied": []} for kind in ("health", "upload", "download")}
        with httpx.Client(verify=verify, timeout=60) as client:
            for kind in times:
                for _ in range(args.repeat):
                    for route, port in (("direct", up_port), ("proxied", proxy_port)):
                        times[kind][route].append(timed(client, f"https://localhost:{port}", kind))
    finally:
        proxy.stop()
        upstream.stop()
    results = {}
    for kind, by_route in times.items():
        direct, proxied = (statistics.median(by_route[r]) for r in ("direct", "proxied"))
        results[kind] = {"direct_median_ms": direct * 1e3, "proxied_median_ms": proxied * 1e3,
                         "added_ms": (proxied - direct) * 1e3, "ratio": proxied / direct}
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_avg_1min_at_end": os.getloadavg()[0], "repeat": args.repeat, "object_bytes": OBJECT,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"{'':10s} {'direct (ms)':>12s} {'proxied (ms)':>13s} {'added (ms)':>11s} {'ratio':>6s}")
    for kind, r in results.items():
        print(f"{kind:10s} {r['direct_median_ms']:12.2f} {r['proxied_median_ms']:13.2f} {r['added_ms']:11.2f} "
              f"{r['ratio']:6.2f}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
