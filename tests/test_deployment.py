"""The app through Flower's Deployment Engine: a real SuperLink and two SuperNodes on 127.0.0.1.

Each process stands for one machine: the SuperLink and every SuperNode have their own FLWR_HOME,
working directory and shopcast install (the operator's wheel unpacked into it, on its PYTHONPATH), and
share no path. Each SuperNode points the unchanged ClientApp at its own CSV with
`--node-config 'data-path="..."'`. `flwr run` bundles the operator's copy of the app, with the run's
config in its configs/, into a FAB, the SuperLink runs the ServerApp, and the test checks the run's
status with `flwr ls` (a failed run can still exit 0), the server's files in its relative out_dir, and
that the server and every merchant started from the base their own install carries.
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
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shared import pipeline as base_resolution
from shared.adapter import adapter_state, load_shared_state, shared_state
from shared.config import ConfigError, load_config
from shared.pipeline import ForecastPipeline, base_folder, input_shape, installed_root
from shared.schema import prepare
from shared.sources import load_table, one_merchant
from shared.synthetic import generate_merchants

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MAKE_CERTS = REPO / "server" / "deploy" / "make_certs.sh"
BASE_CONFIG = REPO / "configs" / "deploy_test.toml"
HOST = "127.0.0.1"
APP_PARTS = ("pyproject.toml", "README.md", "client", "server", "shared", "simulations", "configs")  # what the operator holds
RUN_CONFIG = "configs/deploy_run.toml"  # the run's config, put in the operator's configs/ (it travels in the FAB)
TINY_BASE = "shared/base/tiny_test"  # a base for the tiny backbone, shipped in the operator's wheel only

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

    def __init__(self, root: Path, app: Path, wheel: Path, tls: bool = False) -> None:
        self.root, self.app, self.wheel, self.tls = root, app, wheel, tls
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
    def machine(self, name: str) -> dict[str, str]:
        """`root/name` as one machine of its own: shopcast installed there from the operator's wheel
        (what `pip install --target site` does with a pure-Python wheel) and nothing else on PYTHONPATH."""
        site = self.root / name / "site"
        zipfile.ZipFile(self.wheel).extractall(site)
        return {"PYTHONPATH": str(site)}

    def spawn(self, name: str, args: list[str], job: bool = False, home: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Starts VENV_BIN/args[0] in its own session, with cwd and FLWR_HOME `home` (default
        `root/name`: one "machine" each), `env` on top, and its output in `root/name.log`."""
        home = home or self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(VENV_BIN / args[0]), *args[1:]], cwd=home, env=self.env | {"FLWR_HOME": str(home)} | (env or {}),
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
                                 "--host", HOST, "--port", str(self.port), *extra], env=self.machine("superlink"))
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
                          job=job, env=self.machine(f"supernode{i}"))

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

    def start_run(self) -> subprocess.Popen:
        """`flwr run APP test --stream` in the operator's copy: builds the FAB, submits the run of
        RUN_CONFIG (a path inside the bundle) and streams its log until it ends.

        One streaming `flwr` process instead of polling `flwr ls`: each CLI call imports flwr (seconds
        of CPU that the ServerApp and ClientApps need on a small runner). Started before the SuperNodes
        connect so that building the FAB overlaps their start; the strategy waits for min_replies nodes."""
        return self.spawn("flwr-run", ["flwr", "run", str(self.app), "test", "--run-config", f'config="{RUN_CONFIG}"', "--stream"],
                          job=True, home=self.root / "cli")

    def finish_run(self, run: subprocess.Popen) -> dict:
        """Waits for the run to end (stops it after RUN_S); returns its `flwr ls` entry, asserting it completed."""
        deadline = time.monotonic() + RUN_S
        while run.poll() is None and time.monotonic() < deadline:
            self.check_alive()
            time.sleep(1)
        output = (self.root / "flwr-run.log").read_text(errors="replace")
        found = re.search(r"started run (\d+)", output)
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
    app = operator_app(root / "operator")
    fed = Federation(root, app, build_wheel(app, root / "dist"), tls)
    try:
        yield fed
    finally:
        fed.stop()


def merchant_files(root: Path) -> list[Path]:
    """Two merchants' files in the long schema, one merchant per file, each on its SuperNode's machine."""
    frame = generate_merchants(n_merchants=2, n_days=240, seed=0)
    paths = []
    for i, (_, rows) in enumerate(frame.groupby("merchant_id", sort=True)):
        path = root / f"supernode{i}" / "sales.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(path, index=False)
        paths.append(path)
    return paths


def app_copy(dest: Path) -> Path:
    """The operator's copy of the app: what `flwr run` bundles and `pip install` builds."""
    dest.mkdir(parents=True)
    for name in APP_PARTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, dest / name)
    return dest


def build_wheel(app: Path, dest: Path) -> Path:
    """The app's wheel, as `pip wheel` builds it, through setuptools' PEP 517 hook (no pip, no network)."""
    script = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", script, str(dest)], cwd=app, capture_output=True, text=True, timeout=300, check=True)
    return dest / res.stdout.split()[-1]


def operator_app(dest: Path) -> Path:
    """The operator's copy with the run's config in its configs/ (deploy_test.toml training only the
    head, so the rest of every model keeps its base's values) and a base that fits the tiny backbone
    among the shipped ones: `base = "auto"` must find it on every machine. The base is pretrained a
    little from another seed, so that its forecasts differ from the seeded init's."""
    import tomli_w  # a flwr dependency

    app = app_copy(dest)
    raw = tomllib.loads(BASE_CONFIG.read_text())
    raw["model"]["shared"] = ["head"]
    (app / RUN_CONFIG).write_text(tomli_w.dumps(raw))
    cfg = load_config(app / RUN_CONFIG, {"model.base": "", "model.seed": 1, "model.shared": []})
    table = prepare(generate_merchants(n_merchants=2, n_days=240, seed=1), cfg.data, "synthetic")
    pretrained = ForecastPipeline.from_config(cfg, table)
    pretrained.fit(pretrained.splits(table).train, steps=30)
    pretrained.save(app / TINY_BASE / cfg.model.variant)
    return app


def check_outputs(out: Path, run: dict) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1
    round1 = summary["history"][0]
    assert round1["accepted"] == 2 and not round1["failures"] and not round1["rejected"], round1
    assert set(round1["merchants"]) == {"0", "1"}, "partition-id from each SuperNode's node config"
    assert (out / "final_adapter").is_dir() and any((out / "final_adapter").iterdir())
    assert run["fab-id"] == "shopcast/shopcast"
    return summary


def check_started_from_base(app: Path, out: Path, data: list[Path], summary: dict) -> None:
    """The server and both merchants started from the tiny base (from their own installs), not from the
    seeded init: the final adapter keeps the base's values outside [model] shared, and each merchant's
    holdout score of it, computed on its own machine, is the one that model with the base gives."""
    final = load_file(str(out / "final_adapter" / "adapter.safetensors"))
    from_base, seeded = (ForecastPipeline.from_config(load_config(app / RUN_CONFIG, {"model.base": base}))
                         for base in (str(app / TINY_BASE), ""))
    trained = set(shared_state(from_base.model))
    kept = {name: value for name, value in adapter_state(from_base.model).items() if name not in trained}
    assert trained and kept
    assert all(torch.equal(final[name], value) for name, value in kept.items()), "the server did not start from the base"
    for pipeline in (from_base, seeded):
        load_shared_state(pipeline.model, {name: final[name] for name in trained})
    cfg = from_base.cfg
    for i, path in enumerate(data):
        merchant, table = one_merchant(load_table(replace(cfg, data=replace(cfg.data, source="file", path=str(path)))), None)
        wql = [float(np.nanmean(p.score(p.splits(table.for_merchant(merchant)))["wql"])) for p in (from_base, seeded)]
        assert summary["history"][0]["merchants"][str(i)]["eval-wql"] == pytest.approx(wql[0], rel=1e-4), f"merchant {i}: not from the base"
        assert wql[1] != pytest.approx(wql[0], rel=1e-3), "the seeded init scores as the base does: the check could not fail"


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


@pytest.fixture
def bundle_without_weights(tmp_path, monkeypatch) -> Path:
    """This code run from an app bundle: the shipped bases' meta.json beside it, their weights not."""
    bundle = tmp_path / "bundle"
    for meta in base_resolution.SHIPPED_BASES.glob("*/*/meta.json"):
        dest = bundle / "shared" / "base" / meta.relative_to(base_resolution.SHIPPED_BASES)
        dest.parent.mkdir(parents=True)
        shutil.copy2(meta, dest)
    monkeypatch.setattr(base_resolution, "PROJECT_ROOT", bundle)
    monkeypatch.setattr(base_resolution, "SHIPPED_BASES", bundle / "shared" / "base")
    return bundle


def test_auto_takes_the_weights_from_the_installed_package_in_a_bundle(bundle_without_weights, tmp_path, monkeypatch):
    site = tmp_path / "site"
    shutil.copytree(REPO / "shared" / "base" / "daily28", site / "shared" / "base" / "daily28")
    monkeypatch.setattr(base_resolution, "installed_root", lambda: site)
    cfg = load_config(None, {"data.horizon": 28})
    assert base_folder(cfg, input_shape(cfg)) == site / "shared" / "base" / "daily28" / "llm"


def test_auto_refuses_a_fitting_base_whose_weights_are_on_no_root(bundle_without_weights, monkeypatch):
    """Deployed without the package data, a federation used to start from the seeded init without a word."""
    monkeypatch.setattr(base_resolution, "installed_root", lambda: None)
    cfg = load_config(None, {"data.horizon": 28})
    with pytest.raises(ConfigError, match=r'base = "auto" picks shared/base/daily28/llm, but its weights are in none of .*pip install'):
        base_folder(cfg, input_shape(cfg))


def test_auto_warns_where_no_shipped_base_is_listed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(base_resolution, "SHIPPED_BASES", tmp_path)
    cfg = load_config(None, {"data.horizon": 28})
    assert base_folder(cfg, input_shape(cfg)) is None
    assert "lists no shipped base; the model starts from the seeded init" in caplog.text


@pytest.mark.parametrize("editable", [False, True])
def test_installed_root_is_the_wheels_site_or_the_editable_source_tree(tmp_path, monkeypatch, editable):
    info = tmp_path / "shopcast-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shopcast\nVersion: 0.1.0\n")
    if editable:
        (info / "direct_url.json").write_text(json.dumps({"dir_info": {"editable": True}, "url": (tmp_path / "src").as_uri()}))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_root() == (tmp_path / "src" if editable else tmp_path)


def test_the_wheel_carries_every_shipped_base(tmp_path):
    """What `base = "auto"` loads on a machine whose app bundle carries no weights (pip install .)."""
    names = set(zipfile.ZipFile(build_wheel(app_copy(tmp_path / "app"), tmp_path / "dist")).namelist())
    bases = [meta.parent.relative_to(REPO).as_posix() for meta in (REPO / "shared" / "base").glob("*/*/meta.json")]
    assert len(bases) >= 6
    assert {f"{base}/{name}" for base in bases for name in ("meta.json", "adapter.safetensors", "MODEL_CARD.md")} <= names


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec's and click's, raised inside flwr's builder
def test_fab_leaves_out_venv_runs_and_tests():
    """`flwr run` bundles the repo with .gitignore applied (.venv/, runs/, .flwr/ ...) and Flower's built-ins,
    and each shipped base's meta.json, which a FAB can carry, but not its weights, which it cannot."""
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
    assert {"shared/base/daily/llm/meta.json", "shared/base/daily28/llm/meta.json"} <= set(names)
    assert not [n for n in names if n.endswith(".safetensors")], names
    assert len(fab) < 2 * 1024 * 1024, f"FAB is {len(fab)} bytes"


@pytest.mark.slow
@needs_flower
def test_deployment_one_round_insecure(tmp_path):
    data = merchant_files(tmp_path)
    with federation(tmp_path) as fed:
        fed.start_superlink()
        run = fed.start_run()
        for i, path in enumerate(data):
            fed.start_supernode(i, path)
        status = fed.finish_run(run)
    out = tmp_path / "superlink" / "runs" / "deploy_test"  # the run config's relative out_dir, in the SuperLink's cwd
    check_started_from_base(fed.app, out, data, check_outputs(out, status))


@pytest.mark.slow
@needs_flower
@needs_openssl
@needs_ssh_keygen
def test_deployment_one_round_tls_supernode_auth(tmp_path):
    """TLS with make_certs.sh's CA, and only registered SuperNode keys may join."""
    data = merchant_files(tmp_path)
    with federation(tmp_path, tls=True) as fed:
        make_certs(fed.certs, n_supernodes=3)
        fed.start_superlink("--enable-supernode-auth")
        run = fed.start_run()
        for i in range(2):  # what the operator does with each merchant's snI.pub
            fed.flwr("supernode", "register", str(fed.certs / f"sn{i}.pub"), "test", "--format", "json")
        for i, path in enumerate(data):
            fed.start_supernode(i, path, "--auth-supernode-private-key", str(fed.certs / f"sn{i}"))
        # a third machine whose key nobody registered is turned away (its process lingers: no exit code to check)
        fed.start_supernode(2, data[0], "--auth-supernode-private-key", str(fed.certs / "sn2"), job=True)
        status = fed.finish_run(run)
        assert "[code: 2004] Failed to activate SuperNode" in (tmp_path / "supernode2.log").read_text(errors="replace"), fed.logs()
    out = tmp_path / "superlink" / "runs" / "deploy_test"
    summary = check_outputs(out, status)
    check_started_from_base(fed.app, out, data, summary)
    assert len({m["node"] for m in summary["history"][0]["merchants"].values()}) == 2
