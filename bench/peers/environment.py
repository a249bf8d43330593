"""The peers' own virtual environments under bench/.peers/, for bench/train_step.py and the
interop proofs (tests/test_interop_peers.py): created on first use with the running torch version, from PyPI and /opt/wheels only, atomically (a build
that is interrupted leaves nothing the next run mistakes for a ready environment), with progress
on stderr. Imported by the benchmark and the tests, not by the runners that execute inside those
environments; `python bench/peers/environment.py sparsify saelens` builds them ahead (CI does).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
PEERS = {"sparsify": "eai-sparsify", "saelens": "sae-lens", "circuit_tracer": "circuit-tracer"}
LOCAL_WHEELS = Path("/opt/wheels")
MODULES = {"sparsify": "sparsify", "saelens": "sae_lens", "circuit_tracer": "circuit_tracer.frontend.graph_models"}
# Peers installed without their dependencies and without torch, with only these: the graph
# exports are proved against circuit-tracer's frontend schema, which needs pydantic alone (the
# rest of circuit-tracer, a transformer-lens model wrapper, is not what the proof exercises).
SCHEMA_ONLY = {"circuit_tracer": ["pydantic"]}
READY = ".ready"  # written last into a peer environment; only a folder holding it is used
# pip's per-request timeout and retries, so that an index that does not answer costs at most
# (retries + 1) x timeout per URL, and pip is stopped once it meets that on a second URL (see
# _run_logged). The limits bound each whole step even if pip keeps making slow progress.
PIP_TIMEOUT_S, PIP_RETRIES = 15, 2
PIP_LIMIT_S, VENV_LIMIT_S = 1800, 300
HEARTBEAT_S = 10
# pip's warning when a request to an index fails and it tries again: how many tries are left,
# what broke (NewConnectionError, ConnectTimeoutError, SSLError, ReadTimeoutError, ...) and the URL.
RETRY = re.compile(r"Retrying \(Retry\(total=(\d+).*after connection broken by '(\w+)\((.*)\)': (\S+)$")


def _network_failure(match: re.Match) -> str:
    detail = re.sub(r"<[^>]*>[,:]?\s*", "", match.group(3)).strip(" '\"")
    return f"{match.group(2)}: {detail[:160]}"



def say(message: str) -> None:
    """Progress of a peer environment's creation, on stderr: stdout stays the benchmark's."""
    print(f"[peers] {message}", file=sys.stderr, flush=True)


# Runs a command so that it gets SIGTERM when this process dies (say when `timeout` or a user
# kills the benchmark; PR_SET_PDEATHSIG survives the exec on Linux): no orphaned pip keeps writing
# into a building folder that the next run is about to remove. A launcher rather than
# preexec_fn, which is unsafe in a process with threads (torch's among them).
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):  # the parent died before prctl took effect\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _run_logged(command: list[str], what: str, log, lock_fd: int, limit_s: float) -> list[str]:
    """Run `command`, its output going to `log`, printing a heartbeat (elapsed seconds, packages
    collected so far, pip's last line) every HEARTBEAT_S seconds. Raises RuntimeError with pip's
    telling lines when it fails or runs past `limit_s`."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    start = time.monotonic()
    launcher = [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid())]
    proc = subprocess.Popen([*launcher, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
                            # The lock travels with pip: while any pip of ours lives, no other run
                            # takes the lock and removes the folder pip writes into.
                            pass_fds=(lock_fd,))
    lines: list[str] = []
    exhausted: list[str] = []  # URLs that pip has retried to the last try for want of a network
    unreachable: list[str] = []  # set when pip meets the same wall again on another URL: stop it

    def read() -> None:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.strip():
                lines.append(line.rstrip())
            retry = RETRY.search(line.rstrip())
            if retry and not unreachable:
                url = retry.group(4)
                if exhausted and url not in exhausted:
                    # pip gave up on one URL and now fails on the next: every package would cost
                    # (retries + 1) tries; fail now instead of in a quarter of an hour.
                    unreachable.append(f"{_network_failure(retry)}; at {exhausted[0]} and {url}")
                    proc.kill()
                elif retry.group(1) == "0":
                    exhausted.append(url)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while True:
            try:
                proc.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - start
                if elapsed > limit_s:
                    proc.kill()
                    proc.wait()
                    reader.join(5)
                    raise RuntimeError(f"{what} gave up after {elapsed:.0f} s; last: {lines[-1] if lines else '-'} "
                                       f"(log: {log.name})") from None
                collected = sum(line.startswith(("Collecting ", "Processing ")) for line in lines)
                # pip's warnings about the configured local mirrors lacking a package are noise
                last = next((line for line in reversed(lines) if not line.startswith("WARNING")), "-")
                say(f"  ... {what}: {elapsed:.0f} s, {collected} packages collected so far, last: {last.strip()[:90]}")
    except BaseException:  # KeyboardInterrupt included: never leave pip running behind us
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    reader.join(5)
    if unreachable:
        raise RuntimeError(f"{what} stopped after {time.monotonic() - start:.0f} s: an index does not answer "
                           f"({unreachable[0]}) and pip would try it {PIP_RETRIES + 1} times for every package; "
                           f"check `pip config list` and PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (log: {log.name})")
    if proc.returncode != 0:
        errors = [line.strip() for line in lines if line.startswith("ERROR")] or lines[-2:]
        network = [m for line in lines if (m := RETRY.search(line))]
        if network:  # the usual cause on a machine that cannot reach an index: say so plainly
            errors.insert(0, f"an index did not answer ({_network_failure(network[-1])}, at {network[-1].group(4)})")
        detail = " | ".join(dict.fromkeys(errors[-4:]))[-600:]
        raise RuntimeError(f"{what} failed after {time.monotonic() - start:.0f} s: {detail} (log: {log.name})")
    return lines


def _build_peer(name: str, building: Path, final: Path, lock_fd: int) -> None:
    """Create the venv in `building`, install our torch and the peer, check the peer imports,
    point the scripts in bin/ at `final`, where the folder is about to move, and write the READY
    marker last."""
    python = building / "bin" / "python"
    # Only reachable indexes: PyPI (and the pip configuration's local mirrors) and, when it is
    # there, the local wheel folder. No download.pytorch.org: a machine that cannot reach it
    # hangs in pip's retries. The public version pins the running torch: pip ranks a local
    # build such as 2.13.0+cpu above the plain 2.13.0, so with /opt/wheels holding our wheel
    # it installs that very file (checked: `pip download --no-deps torch==2.13.0` takes
    # /opt/wheels/torch-2.13.0+cpu-...whl); elsewhere it takes PyPI's build of the same version.
    torch_req = f"torch=={torch.__version__.split('+')[0]}"
    links = ["--find-links", str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir() else []
    pip = [str(python), "-m", "pip", "install", "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES),
           "--progress-bar", "off", *links]
    log_path = BENCH / ".peers" / f"{name}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        say(f"{name}: first use, creating its environment in {building.relative_to(BENCH.parent)} "
            f"(pip log: {log_path.relative_to(BENCH.parent)})")
        step = time.monotonic()
        say(f"{name}: creating the venv")
        _run_logged([sys.executable, "-m", "venv", str(building)], "creating the venv", log, lock_fd, VENV_LIMIT_S)
        step = time.monotonic()
        if name in SCHEMA_ONLY:
            say(f"{name}: venv created; installing {PEERS[name]} without its dependencies, and {', '.join(SCHEMA_ONLY[name])}")
            _run_logged([*pip, "--no-deps", PEERS[name]], f"pip install {PEERS[name]}", log, lock_fd, PIP_LIMIT_S)
            _run_logged([*pip, *SCHEMA_ONLY[name]], f"pip install {' '.join(SCHEMA_ONLY[name])}", log, lock_fd, PIP_LIMIT_S)
            their_torch = "none"
            _run_logged([str(python), "-P", "-c", f"import {MODULES[name]}"], f"import {MODULES[name]}", log, lock_fd, VENV_LIMIT_S)
        else:
            say(f"{name}: venv created in {time.monotonic() - step:.0f} s; installing {torch_req}")
            _run_logged([*pip, torch_req], f"pip install {torch_req}", log, lock_fd, PIP_LIMIT_S)
            say(f"{name}: torch installed in {time.monotonic() - step:.0f} s; installing {PEERS[name]}")
            step = time.monotonic()
            # torch named again so that the resolver keeps it: the peer must be timed on our torch.
            _run_logged([*pip, PEERS[name], torch_req], f"pip install {PEERS[name]}", log, lock_fd, PIP_LIMIT_S)
            say(f"{name}: {PEERS[name]} installed in {time.monotonic() - step:.0f} s; checking `import {MODULES[name]}`")
            their_torch = _run_logged([str(python), "-P", "-c", f"import {MODULES[name]}, torch; print(torch.__version__)"],
                                      f"import {MODULES[name]}", log, lock_fd, VENV_LIMIT_S)[-1:] or ["?"]
            their_torch = their_torch[0]
    if their_torch not in (torch.__version__, "none"):
        say(f"{name}: note: it runs torch {their_torch}, this environment {torch.__version__}")
    # Cosmetic for this script, which runs only bin/python (a symlink) and `python -m pip`, but
    # it keeps bin/pip, entry points and bin/activate usable by hand after the move.
    for script in (building / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.stat().st_size < 1 << 20:
            try:
                text = script.read_text()
            except UnicodeDecodeError:
                continue
            if str(building) in text:
                script.write_text(text.replace(str(building), str(final)))
    (building / READY).write_text(f"{PEERS[name]} on torch {their_torch}, built in {time.monotonic() - start:.0f} s\n")


def peer_python(name: str) -> Path:
    """The peer's interpreter, creating its environment first if needed.

    The environment is built in a sibling folder, bench/.peers/.<name>-building-<pid>, and
    renamed into place only after the peer imports and the READY marker is written: a build
    that is interrupted (killed, Ctrl-C, pip failing) never occupies bench/.peers/<name>, and a
    folder there without the marker (say from an older version of this script) is rebuilt.
    Renaming a venv is safe for what this script does with it: bin/python is a symlink to the
    base interpreter and pyvenv.cfg names only the base, so the interpreter finds its
    site-packages from its own location after the move (checked below: sys.prefix must be the
    new folder). Only the scripts in bin/ (bin/pip, entry points, activate) name the folder;
    pip runs as `python -m pip` while building, and those scripts are pointed at the final
    path before the move. Creating the venv in place under its final name instead would need
    the marker alone to tell a finished environment, and a crash would leave a half-built one
    where the next run looks; with the rename, the final name only ever holds finished ones.
    Builders take an exclusive lock on bench/.peers/.<name>.lock, so concurrent runs build one
    environment, and any building folder found under the lock is stale and removed."""
    peers_dir = BENCH / ".peers"
    venv = peers_dir / name
    python = venv / "bin" / "python"
    if (venv / READY).is_file():
        return python
    peers_dir.mkdir(parents=True, exist_ok=True)
    with open(peers_dir / f".{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"{name}: waiting for another process that is creating its environment")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / READY).is_file():  # built by the process we waited for
            return python
        for stale in peers_dir.glob(f".{name}-building-*"):
            say(f"{name}: removing {stale.name}, left by an interrupted build")
            shutil.rmtree(stale, ignore_errors=True)
        if venv.exists():
            say(f"{name}: removing {venv.name}, an environment without its {READY} marker")
            shutil.rmtree(venv)
        building = peers_dir / f".{name}-building-{os.getpid()}"
        start = time.monotonic()
        try:
            _build_peer(name, building, venv, lock.fileno())
            os.rename(building, venv)
        finally:
            shutil.rmtree(building, ignore_errors=True)  # gone after the rename; else a failed build
        prefix = subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"],
                                check=False, capture_output=True, text=True)
        if prefix.returncode != 0 or Path(prefix.stdout.strip()).resolve() != venv.resolve():
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(f"{name}'s environment does not work after its move into place: "
                               f"{(prefix.stderr.strip() or prefix.stdout.strip())[-300:]}")
        say(f"{name}: environment ready in {time.monotonic() - start:.0f} s")
    return python




if __name__ == "__main__":
    for peer in sys.argv[1:] or list(PEERS):
        if peer not in PEERS:
            sys.exit(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
        say(f"{peer}: {peer_python(peer)}")
