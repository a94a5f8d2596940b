"""Raw TCP on emulated links, one way and both ways at once: what the slow member of a butterfly can expect.

In a butterfly all-reduce the slowest member uploads its contributions and
downloads the means at the same time. This measures what plain TCP (python
sockets, no libp2p, no codecs) achieves in that pattern on a links file's links
(root only): machine 0 sends S/(N-1) bytes to each other machine and receives
S/(N-1) from each, (a) upload only, (b) download only, (c) both at once over
separate connections, (d) both at once over one connection per pair (as libp2p
does), and (c, d) again with the senders pacing themselves to `--pace` of machine
0's downlink in 16 KB pieces. Times are against S / (machine 0's rate).

    sudo python scripts/bench_duplex.py --links peers/links-one-slow.toml --mb 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PORT = 5001
PIECE = 16 * 1024

# one process per far machine: serves "u" (it reads), "d" (it sends), "b" (both on one connection)
SERVER = r'''
import socket, sys, threading, time
size, rate, piece = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])

def read(c, n):
    got = 0
    while got < n:
        b = c.recv(1 << 20)
        if not b:
            break
        got += len(b)

def send(c, n):
    if rate <= 0:
        c.sendall(b"x" * n)
        return
    start, sent = time.time(), 0
    while sent < n:
        k = min(piece, n - sent)
        c.sendall(b"x" * k)
        sent += k
        ahead = sent / rate - (time.time() - start)
        if ahead > 0:
            time.sleep(ahead)

def serve(c):
    kind = c.recv(1)
    if kind == b"u":
        read(c, size)
    elif kind == b"d":
        send(c, size)
    else:
        reader = threading.Thread(target=read, args=(c, size))
        reader.start()
        send(c, size)
        reader.join()
    c.sendall(b"k")
    c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
''' % PORT

# machine 0: the transfers of one pattern to every far machine at once; prints the seconds until all are done
CLIENT = r'''
import socket, sys, threading, time
addrs, size, kinds = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3]

def run(addr, kind):
    c = socket.create_connection((addr, %d))
    c.sendall(kind.encode())
    if kind in "ub":
        writer = threading.Thread(target=c.sendall, args=(b"x" * size,))
        writer.start()
    want = (size if kind in "db" else 0) + 1
    got = 0
    while got < want:
        b = c.recv(1 << 20)
        if not b:
            raise SystemExit(f"{addr} closed early")
        got += len(b)
    if kind in "ub":
        writer.join()

start = time.time()
threads = [threading.Thread(target=run, args=(a, k)) for a in addrs for k in kinds.split("+")]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(time.time() - start, flush=True)
''' % PORT

PATTERNS = [("upload only", "u", False), ("download only", "d", False),
            ("both ways, separate connections", "u+d", False), ("both ways, one connection per pair", "b", False),
            ("both ways, separate connections, paced", "u+d", True),
            ("both ways, one connection per pair, paced", "b", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", default=os.path.join(ROOT, "peers", "links-one-slow.toml"))
    ap.add_argument("--peers", type=int, default=4, help="machines: machine 0 and the others")
    ap.add_argument("--mb", type=float, default=4.0, help="S: megabytes machine 0 sends (and receives) in all")
    ap.add_argument("--pace", type=float, default=0.95, help="the paced patterns: share of machine 0's downlink")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from p2p_diloco.emulation.links import read_links
    from p2p_diloco.emulation.wan import Wan, exit_on_sigterm

    exit_on_sigterm()
    _, links = read_links(args.links, args.peers)
    far = list(range(1, len(links)))
    size = int(args.mb * 1e6) // len(far)
    one_way = args.mb * 1e6 / (min(links[0].up_mbit, links[0].down_mbit) * 125_000)
    rows = []
    with Wan(links) as net:
        servers = {}
        try:
            for paced in (False, True):
                rate = args.pace * links[0].down_mbit * 125_000 / len(far) if paced else 0.0
                for i in far:
                    servers[i] = net.popen(i, [sys.executable, "-c", SERVER, str(size), str(rate), str(PIECE)],
                                           stdout=subprocess.PIPE, text=True)
                    if servers[i].stdout.readline().strip() != "ready":
                        raise SystemExit(f"the server on machine {i} did not start")
                addrs = ",".join(net.address(i) for i in far)
                for name, kinds, pattern_paced in PATTERNS:
                    if pattern_paced != paced:
                        continue
                    times = []
                    for _ in range(args.repeats):
                        out = net.run(0, [sys.executable, "-c", CLIENT, addrs, str(size), kinds],
                                      capture_output=True, text=True, timeout=30 + 20 * one_way)
                        if out.returncode != 0:
                            raise SystemExit(f"{name}: {out.stderr.strip()[-500:]}")
                        times.append(float(out.stdout))
                    rows.append({"pattern": name, "paced": paced, "seconds": times,
                                 "median_over_one_way": statistics.median(times) / one_way})
                    print(f"{name:45s} {' '.join(f'{t:5.2f}' for t in times)} s   "
                          f"median {rows[-1]['median_over_one_way']:.2f}x S/R ({one_way:.2f} s)", flush=True)
                for p in servers.values():
                    p.kill()
                    p.wait()
                servers.clear()
        finally:
            for p in servers.values():
                p.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"links": args.links, "bytes": args.mb * 1e6, "one_way_s": one_way, "pace": args.pace,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
