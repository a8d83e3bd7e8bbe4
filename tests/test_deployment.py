"""The app through Flower's Deployment Engine: a real SuperLink and two SuperNodes on 127.0.0.1.

Each SuperNode stands for one merchant's machine: it has its own FLWR_HOME and working directory
and points the unchanged ClientApp at its own CSV with `--node-config 'data-path="..."'`. `flwr run`
bundles the repository into a FAB, the SuperLink runs the ServerApp, and the test checks the run's
status with `flwr ls` (a failed run can still exit 0) and the server's files in a temporary out_dir.
The TLS variant uses certificates from server/deploy/make_certs.sh and SuperNode authentication.

Every process gets its own session; the finally blocks end those sessions and any process they
spawned (SuperExec, flwr-serverapp, flwr-clientapp). Only 127.0.0.1 is used.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from shared.synthetic import generate_merchants

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MAKE_CERTS = REPO / "server" / "deploy" / "make_certs.sh"
BASE_CONFIG = REPO / "configs" / "deploy_test.toml"
HOST = "127.0.0.1"

needs_flower = pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists(), reason=f"flower-superlink not in {VENV_BIN} (flwr not installed in this venv)"
)
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH (make_certs.sh needs it)")
needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not on PATH (SuperNode keys)")

STARTUP_S = 60  # until the SuperLink listens
RUN_S = 300  # one round, from `flwr run` to its end: ~100 s on 2 idle cores, twice that when other suites run beside it


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


class Federation:
    """Processes of one test federation, their logs, and the `flwr` CLI pointed at them."""

    def __init__(self, root: Path, tls: bool = False) -> None:
        self.root, self.tls = root, tls
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []  # servers: must stay up
        self.jobs: list[tuple[str, subprocess.Popen, Path]] = []  # may exit (flwr run, a rejected SuperNode)
        self.certs = root / "certs"
        base = {k: v for k, v in os.environ.items() if not k.startswith("SHOPCAST_")}
        self.env = base | {
            "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}",  # SuperLink/SuperNode spawn flower-superexec, flwr-*app by name
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": "1",  # two ClientApps and the ServerApp share a small runner's cores
            "PYTHONUNBUFFERED": "1",
        }
        cli_home = root / "cli"
        cli_home.mkdir(parents=True)
        entry = {"address": self.address}
        entry |= {"root-certificates": str(self.certs / "ca.crt")} if tls else {"insecure": True}
        lines = ["[superlink]", 'default = "test"', "", "[superlink.test]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
        (cli_home / "config.toml").write_text("\n".join(lines) + "\n")

    # -- processes ---------------------------------------------------------------------------
    def spawn(self, name: str, args: list[str], job: bool = False, home: Path | None = None) -> subprocess.Popen:
        """Starts VENV_BIN/args[0] in its own session, with cwd and FLWR_HOME `home` (default
        `root/name`: one "machine" each) and its output in `root/name.log`."""
        home = home or self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(VENV_BIN / args[0]), *args[1:]], cwd=home, env=self.env | {"FLWR_HOME": str(home)},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        (self.jobs if job else self.procs).append((name, proc, log))
        return proc

    def tls_args(self, superlink: bool) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        if superlink:
            return ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key")]
        return ["--root-certificates", str(self.certs / "ca.crt")]

    def start_superlink(self, *extra: str) -> None:
        """Starts it and waits until it listens (uvicorn binds after its startup hooks have run)."""
        self.spawn("superlink", ["flower-superlink", *self.tls_args(True), "--database", "state.db",
                                 "--host", HOST, "--port", str(self.port), *extra])
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"SuperLink not listening within {STARTUP_S} s\n{self.logs()}")

    def start_supernode(self, i: int, data: Path, *extra: str, job: bool = False) -> subprocess.Popen:
        node_config = f'partition-id={i} data-path="{data}"'
        return self.spawn(f"supernode{i}", ["flower-supernode", *self.tls_args(False), "--superlink", self.address,
                                            "--host", HOST, "--port", str(free_port()), "--node-config", node_config, *extra],
                          job=job)

    def check_alive(self) -> None:
        dead = [f"{name} (exit {p.returncode})" for name, p, _ in self.procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"exited early: {', '.join(dead)}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"----- {name} ({log})\n{_tail(log)}" for name, _, log in self.procs + self.jobs)

    def stop(self) -> None:
        """SIGTERM each session, then SIGKILL what is left; children that started their own session
        (the SuperLink's SuperExec) are found with psutil and signalled too."""
        try:
            import psutil  # installed with flwr[simulation] (ray)
        except ImportError:  # pragma: no cover
            psutil = None
        everything = self.procs + self.jobs
        children = []
        for _, proc, _ in everything:
            if psutil is not None and proc.poll() is None:
                try:
                    children += psutil.Process(proc.pid).children(recursive=True)
                except psutil.Error:
                    pass
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            for _, proc, _ in everything:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
            for child in children:
                try:
                    child.send_signal(sig)
                except Exception:  # already gone
                    pass
            deadline = time.monotonic() + wait_s
            for _, proc, _ in everything:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if psutil is not None:
                children = psutil.wait_procs(children, timeout=max(0.1, deadline - time.monotonic()))[1]
            if all(p.poll() is not None for _, p, _ in everything) and not children:
                return

    # -- the flwr CLI ----------------------------------------------------------------------------
    def flwr(self, *args: str, check: bool = True, timeout: float = 60) -> dict:
        """`flwr ARGS` with this federation's config.toml; its JSON output (for commands given --format json)."""
        res = subprocess.run([str(VENV_BIN / "flwr"), *args], cwd=self.root, env=self.env | {"FLWR_HOME": str(self.root / "cli")},
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise AssertionError(f"flwr {' '.join(args)} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
        match = re.search(r"^\{.*\}\s*\Z", res.stdout, re.S | re.M)
        try:
            return json.loads(match.group(0)) if match else {"stdout": res.stdout, "stderr": res.stderr}
        except json.JSONDecodeError:
            return {"stdout": res.stdout, "stderr": res.stderr}

    def start_run(self, config: Path) -> subprocess.Popen:
        """`flwr run REPO test --stream`: builds the FAB, submits the run and streams its log until it ends.

        One streaming `flwr` process instead of polling `flwr ls`: each CLI call imports flwr (seconds
        of CPU that the ServerApp and ClientApps need on a small runner). Started before the SuperNodes
        connect so that building the FAB overlaps their start; the strategy waits for min_replies nodes."""
        return self.spawn("flwr-run", ["flwr", "run", str(REPO), "test", "--run-config", f'config="{config}"', "--stream"],
                          job=True, home=self.root / "cli")

    def finish_run(self, run: subprocess.Popen, config: Path, retries: int = 1) -> dict:
        """Waits for the run to end (stops it after RUN_S); returns its `flwr ls` entry, asserting it completed."""
        deadline = time.monotonic() + RUN_S
        while run.poll() is None and time.monotonic() < deadline:
            self.check_alive()
            time.sleep(1)
        output = (self.root / "flwr-run.log").read_text(errors="replace")
        found = re.search(r"started run (\d+)", output)
        if not found and retries and "No such file or directory" in output:
            # the FAB build walks the whole working tree: a file another process deletes between the
            # walk and the read (e.g. benchmarks/results/*.json while other suites run) fails it
            return self.finish_run(self.start_run(config), config, retries - 1)
        assert found, f"flwr run started no run (exit {run.poll()})\n{self.logs()}"
        run_id = found.group(1)
        if run.poll() is None:
            self.flwr("stop", run_id, "test", check=False)
        runs = self.flwr("ls", "test", "--run-id", run_id, "--format", "json", check=False).get("runs", [])
        status = runs[0] if runs else {}
        # `flwr run` exits 0 for a failed run too: the status is what tells
        if status.get("status") != "finished:completed":
            raise AssertionError(f"run {run_id} did not complete within {RUN_S} s: {status}\n{self.logs()}")
        return status


@contextmanager
def federation(root: Path, tls: bool = False) -> Iterator[Federation]:
    fed = Federation(root, tls)
    try:
        yield fed
    finally:
        fed.stop()


def merchant_files(root: Path) -> list[Path]:
    """Two merchants' files in the long schema, one merchant per file (what each shop holds)."""
    frame = generate_merchants(n_merchants=2, n_days=240, seed=0)
    paths = []
    for i, (_, rows) in enumerate(frame.groupby("merchant_id", sort=True)):
        path = root / "data" / f"m{i}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(path, index=False)
        paths.append(path)
    return paths


def run_config(root: Path) -> Path:
    """configs/deploy_test.toml with out_dir in `root`. An absolute path, since the ServerApp's cwd is the
    SuperLink's; the file itself is read by the ServerApp and both ClientApps (all on this machine)."""
    import tomli_w  # a flwr dependency

    raw = tomllib.loads(BASE_CONFIG.read_text())
    raw["federation"]["out_dir"] = str(root / "out")
    path = root / "run.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def check_outputs(out: Path, run: dict) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1
    round1 = summary["history"][0]
    assert round1["accepted"] == 2 and not round1["failures"] and not round1["rejected"], round1
    assert set(round1["merchants"]) == {"0", "1"}, "partition-id from each SuperNode's node config"
    assert (out / "final_adapter").is_dir() and any((out / "final_adapter").iterdir())
    assert run["fab-id"] == "shopcast/shopcast"
    return summary


def make_certs(dest: Path, n_supernodes: int = 0) -> None:
    subprocess.run(["bash", str(MAKE_CERTS), str(dest), str(n_supernodes)], check=True, capture_output=True, timeout=120)


@needs_openssl
def test_make_certs_san_and_keys(tmp_path):
    make_certs(tmp_path, 2)
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-text"],
                          check=True, capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")], check=True,
                   capture_output=True)
    for i in range(2):
        assert (tmp_path / f"sn{i}").exists()
        assert (tmp_path / f"sn{i}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0, "private key readable by others"


@needs_openssl
def test_make_certs_tightens_keys_that_already_existed(tmp_path):
    """umask only shapes new files: a key file left 0644 by an earlier run stayed 0644 when overwritten."""
    for name in ("ca.key", "server.key", "sn0"):
        (tmp_path / name).write_text("old")
        (tmp_path / name).chmod(0o644)
    make_certs(tmp_path, 1)
    for name in ("ca.key", "server.key", "sn0"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, f"{name} readable by others"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec's and click's, raised inside flwr's builder
def test_fab_leaves_out_venv_runs_and_tests():
    """`flwr run` bundles the repo with .gitignore applied (.venv/, runs/, .flwr/ ...) and Flower's built-ins."""
    from flwr.cli.build import build_fab_from_files

    def collect() -> dict[str, Path]:  # flwr.cli.utils.collect_files without walking .venv/.git (~10 s)
        files = {}
        for dirpath, dirnames, filenames in os.walk(REPO):
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) == REPO and d in {".venv", ".git"})]
            for name in filenames:
                path = Path(dirpath) / name
                if not path.is_symlink():
                    files[path.relative_to(REPO).as_posix()] = path
        return files

    for attempt in range(3):
        try:
            fab, _ = build_fab_from_files(collect())
            break
        except FileNotFoundError:  # another suite deleted an output (benchmarks/results) mid-build
            if attempt == 2:
                raise
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"server/app.py", "client/app.py", "shared/config.py", "configs/default.toml", "configs/deploy_test.toml"} <= set(names)
    assert not [n for n in names if n.startswith(("runs/", ".venv/", ".flwr/", "outputs/")) or "/test_" in n], names
    assert len(fab) < 2 * 1024 * 1024, f"FAB is {len(fab)} bytes"


@pytest.mark.slow
@needs_flower
def test_deployment_one_round_insecure(tmp_path):
    data = merchant_files(tmp_path)
    config = run_config(tmp_path)
    with federation(tmp_path) as fed:
        fed.start_superlink()
        run = fed.start_run(config)
        for i, path in enumerate(data):
            fed.start_supernode(i, path)
        status = fed.finish_run(run, config)
    check_outputs(tmp_path / "out", status)


@pytest.mark.slow
@needs_flower
@needs_openssl
@needs_ssh_keygen
def test_deployment_one_round_tls_supernode_auth(tmp_path):
    """TLS with make_certs.sh's CA, and only registered SuperNode keys may join."""
    data = merchant_files(tmp_path)
    config = run_config(tmp_path)
    with federation(tmp_path, tls=True) as fed:
        make_certs(fed.certs, n_supernodes=3)
        fed.start_superlink("--enable-supernode-auth")
        run = fed.start_run(config)
        for i in range(2):  # what the operator does with each merchant's snI.pub
            fed.flwr("supernode", "register", str(fed.certs / f"sn{i}.pub"), "test", "--format", "json")
        for i, path in enumerate(data):
            fed.start_supernode(i, path, "--auth-supernode-private-key", str(fed.certs / f"sn{i}"))
        # a third machine whose key nobody registered is turned away (its process lingers: no exit code to check)
        fed.start_supernode(2, data[0], "--auth-supernode-private-key", str(fed.certs / "sn2"), job=True)
        status = fed.finish_run(run, config)
        assert "[code: 2004] Failed to activate SuperNode" in (tmp_path / "supernode2.log").read_text(errors="replace"), fed.logs()
    summary = check_outputs(tmp_path / "out", status)
    assert len({m["node"] for m in summary["history"][0]["merchants"].values()}) == 2
