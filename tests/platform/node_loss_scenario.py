"""Run a search on a two-node Ray cluster and kill the worker node while one of its trials trains.

Runs as the first process of a private network, PID and mount namespace (see
test_multinode.py), where Ray stays on 127.0.0.1 and every process ends with this one. Prints
one JSON line: the search's exit code, whether the worker node was killed, and the tail of
the search's output.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HEAD_PORT = 6390
RAY = str(Path(sys.executable).parent / "ray")


def _processes() -> dict[int, tuple[int, str]]:
    """Return (parent PID, command line) of every process of this namespace, by PID."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        found[int(entry.name)] = (parent, command)
    return found


def _raylets() -> set[int]:
    return {pid for pid, (_, command) in _processes().items() if "/raylet " in command or command.startswith("raylet")}


def _descendants(root: int) -> list[int]:
    processes = _processes()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in processes.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def _trial_on(raylet: int) -> bool:
    processes = _processes()
    return any(ppid == raylet and "ImplicitFunc" in command for ppid, command in processes.values())


def _ray_start(options: list[str], env: dict[str, str]) -> None:
    completed = subprocess.run([RAY, "start", *options], env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(options)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")


def _start_cluster(env: dict[str, str]) -> int:
    """Start a head and a worker node with one CPU each; return the worker's raylet PID."""
    common = ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    _ray_start(["--head", f"--port={HEAD_PORT}", "--include-dashboard=false", *common], env)
    head_raylets = _raylets()
    _ray_start([f"--address=127.0.0.1:{HEAD_PORT}", *common], env)
    worker = _raylets() - head_raylets
    if len(worker) != 1:
        raise RuntimeError(f"expected one new raylet for the worker node, found {sorted(worker)}")
    return worker.pop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--kill-after-s", type=float, default=4.0)
    parser.add_argument("search", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    search_command = args.search[1:] if args.search[:1] == ["--"] else args.search

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Ray's session folders go to a private /tmp/ray, so no process outside this namespace can read them.
    Path("/tmp/ray").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/tmp/ray"], check=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    # A test process may have set this to keep an embedded Ray on one node; this cluster has two.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    worker_raylet = _start_cluster(env)

    log_path = args.work / "search.log"
    with log_path.open("w") as log:
        command = [*search_command, "--ray-address", f"127.0.0.1:{HEAD_PORT}"]
        search = subprocess.Popen(command, cwd=args.work, env=env, stdout=log, stderr=subprocess.STDOUT)

        killed = False
        deadline = time.monotonic() + 300
        while search.poll() is None and time.monotonic() < deadline and not killed:
            if _trial_on(worker_raylet):
                time.sleep(args.kill_after_s)
                for pid in [worker_raylet, *_descendants(worker_raylet)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed = True
            time.sleep(0.2)

        try:
            code = search.wait(timeout=600)
        except subprocess.TimeoutExpired:
            search.kill()
            code = -1

    print(json.dumps({"returncode": code, "killed": killed, "log_tail": log_path.read_text(errors="replace")[-6000:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
