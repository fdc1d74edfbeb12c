"""Engine overhead per client per round, with no-op clients.

Each client answers FitIns with a fixed random d-vector (made once, outside the timing), so
what is timed is the engine: sampling, message construction, the transport, the plain
protection's validation and stacking, FedAvg, the server step and bookkeeping.  With
``--wire`` every message also goes through the codec.

When ``flwr`` is installed, the same workload runs through Flower's server-side path in
the same process: each client's result is serialised with ``ndarrays_to_parameters`` and
aggregated with ``FedAvg.aggregate_fit`` (Flower's simulation needs Ray, which is not a
dependency; this measures Flower's own per-client server work without any transport).

    python benchmarks/engine.py [--repeats 5] [--wire]
    python benchmarks/engine.py --backend ray [--actors 2]   # sites in Ray actors

With ``--backend ray`` the no-op clients live in ``--actors`` Ray actors (a local Ray with
at most 2 CPUs), every message crosses as wire-codec bytes (so ``wire`` is true), and the
report adds ``ray_startup_seconds``: from the command (a fresh interpreter) to the start of
round 1 of the quickstart (10 clients) in 2 actors (``total``), with its timeline (each
mark's seconds from the command, see ``command_to_round_one``), the medians of
``--startup-runs`` commands, next to the same for in-process (``inprocess_startup_seconds``)
and ``ray.init`` alone with securefl's arguments and with Ray's defaults
(``ray_init_alone_seconds``), the machine-speed references, all taking turns; with
``psutil``, the CPU seconds each kind of process had used by round 1 (``cpu_*``): on
``cpu_count`` cores, ``cpu_total / cpu_count`` is a floor under ``total``.

    python benchmarks/engine.py --backend ray --clients          # only the start-up
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from securefl.aggregation import FedAvg
from securefl.config import load_config
from securefl.engine.messages import FitRes, PlainUpdate
from securefl.engine.optim import ServerOptimizer
from securefl.engine.protection import Plain
from securefl.engine.server import Server
from securefl.engine.simulation import InProcessTransport


class NoOpClient:
    def __init__(self, client_id: str, vector: np.ndarray) -> None:
        self.client_id = client_id
        self.reply = FitRes(payload=PlainUpdate(update=vector, weight=1.0), metrics={})

    def handle(self, request, *, round):
        return self.reply


class NoOpSites:
    """The no-op clients of one Ray actor (``setup``: the dimension), built in the actor."""

    def __init__(self, client_ids: list[str], setup: dict) -> None:
        self.clients = {cid: NoOpClient(cid, vector(int(cid[1:]), setup["d"]))
                        for cid in client_ids}

    def announce(self) -> dict[str, bytes]:
        return {}

    def attach(self, directory) -> None:
        pass


def vector(index: int, d: int) -> np.ndarray:
    return np.random.default_rng([0, index]).standard_normal(d, dtype=np.float32) * 1e-3


def start_ray() -> None:
    """A local Ray (2 CPUs) whose actors import this folder and the library."""
    import ray

    here = Path(__file__).resolve().parent
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(here), str(here.parent), os.environ.get("PYTHONPATH")) if p)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


def ray_transport(n: int, d: int, actors: int):
    from securefl.engine.ray_backend import RayTransport, start_hosts
    from securefl.ray_simulation import site_groups

    ids = [f"c{i}" for i in range(n)]
    groups = site_groups(ids, actors=actors, clients_per_actor=n)
    hosts = start_hosts("engine:NoOpSites", groups, {"d": d}, cpus=2 / len(groups), gpus=0.0,
                        threads=None)
    import ray

    ray.get([host.announce.remote() for host in hosts])  # wait until every actor is up
    return RayTransport(hosts, {c: i for i, g in enumerate(groups) for c in g})


def securefl_round_seconds(n: int, d: int, repeats: int, wire: bool, backend: str = "inprocess",
                           actors: int = 2) -> tuple[float, float]:
    started = time.perf_counter()
    if backend == "ray":
        transport = ray_transport(n, d, actors)
    else:
        clients = {f"c{i}": NoOpClient(f"c{i}", vector(i, d)) for i in range(n)}
        transport = InProcessTransport(clients, wire=wire)
    server = Server(transport, Plain(), FedAvg(), ServerOptimizer(),
                    parameters=np.zeros(d, np.float32), seed=0)
    times = []
    for rnd in range(1, repeats + 2):
        t0 = time.perf_counter()
        if rnd == 1:
            startup = t0 - started
        server.run_round(rnd)
        times.append(time.perf_counter() - t0)
    transport.close()
    return statistics.median(times[1:]), startup


def flower_round_seconds(n: int, d: int, repeats: int) -> float | None:
    try:
        import logging

        from flwr.common import Code, Status, ndarrays_to_parameters
        from flwr.common import FitRes as FlFitRes
        from flwr.server.strategy import FedAvg as FlFedAvg
    except ImportError:
        return None
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(d, dtype=np.float32) * 1e-3 for _ in range(n)]
    strategy = FlFedAvg()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        results = [(None, FlFitRes(Status(Code.OK, ""), ndarrays_to_parameters([v]), 1, {}))
                   for v in vectors]
        strategy.aggregate_fit(1, results, [])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


STARTUP = """
import json, sys, time
marks = {}
def imports():
    from securefl.config import load_config
    from securefl.simulation import build_simulation
    marks["imports"] = time.time()
    return load_config, build_simulation
def timed(owner, name, start=None, mark=None):  # marks when owner.name returns
    real = getattr(owner, name, None)
    if real is None:  # a Ray without that step: no mark
        return
    def call(*args, **kwargs):
        if start:
            marks[start] = time.time()
        try:
            return real(*args, **kwargs)
        finally:
            marks[mark or name] = time.time()
    setattr(owner, name, call)
if sys.argv[2] == "ray":  # what `securefl run` does for a [simulation] backend = "ray" file
    import ray
    marks["import_ray"] = time.time()
    timed(ray, "init", "ray_init_start")
    from ray._private import node  # Ray's own steps inside ray.init (a private API: marks only)
    timed(node.Node, "start_gcs_server", mark="ray_gcs_up")
    timed(node.Node, "start_api_server", mark="ray_api_server_up")
    timed(node.Node, "start_ray_processes", mark="ray_raylet_launched")
    timed(node.Node, "__init__", mark="ray_node_registered")
    from securefl.engine.ray_backend import start_early
    load_config, build_simulation = start_early(None, imports)
    import securefl.ray_simulation as rs
    timed(rs, "start_hosts")  # the actors' creation submitted
    timed(rs, "RayTransport")  # every actor's constructor has run
else:
    load_config, build_simulation = imports()
config = load_config(sys.argv[1]).replace(simulation__backend=sys.argv[2], simulation__actors=2)
sim = build_simulation(config)
marks["round_1"] = time.time()  # round 1 starts here
cpu = {}
if sys.argv[2] == "ray":
    actors = ray.get([host.startup.remote() for host in sim.transport.hosts])
    marks.update({f"actors_{k}": max(a[k] for a in actors) for k in actors[0]})
    try:  # CPU seconds of every process of the run, by kind, at round 1
        import os, psutil
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            with proc.oneshot():
                words = proc.cmdline() or [proc.name()]
                cpu_times = proc.cpu_times()
            kind = ("driver" if proc.pid == os.getpid() else words[0].split()[0]
                    if words[0].startswith("ray::") else os.path.basename(
                        next((w for w in words if w.endswith(".py")), words[0])))
            cpu[kind] = cpu.get(kind, 0.0) + cpu_times.user + cpu_times.system
    except ImportError:
        pass
sim.transport.close()
print(json.dumps({"marks": marks, "cpu": cpu}))
"""

#: ``ray.init`` alone in a fresh interpreter (after ``import ray``): with securefl's arguments
#: (:func:`securefl.engine.ray_backend.init_ray`'s) or Ray's defaults
RAY_INIT_ALONE = """
import sys, time
import ray
t = time.time()
if sys.argv[1] == "securefl":
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
else:
    ray.init()
print(time.time() - t)
ray.shutdown()
"""


def ray_install() -> dict[str, object]:
    """Which Ray this measures: ``minimal`` without the dashboard's packages (``aiohttp`` and
    the rest of ``ray[default]``; what ``pip install 'securefl[ray]'`` installs), else
    ``default``: with them Ray's API-server process and dashboard agent load the dashboard's
    modules (``cpu_dashboard.py`` and ``cpu_DashboardAgent`` are larger).  Ray's own test
    decides, in a fresh interpreter (importing ``ray.dashboard.optional_deps``).
    ``pyarrow``: installed, so each actor's serialization context imports it."""
    import importlib.util

    import ray

    probe = subprocess.run([sys.executable, "-c", "import ray.dashboard.optional_deps"],
                           capture_output=True, timeout=120)
    return {"ray": ray.__version__,
            "ray_install": "default" if probe.returncode == 0 else "minimal",
            "pyarrow": importlib.util.find_spec("pyarrow") is not None}


def fresh(code: str, *arguments: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter that imports this tree's securefl; return when it
    started (``time.time()``) and its last line of output."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True,
                          text=True, env=env, check=True, timeout=300, cwd=root)
    return t0, done.stdout.splitlines()[-1]


def command_to_round_one(backend: str) -> dict[str, float]:
    """Seconds from starting a fresh interpreter to the start of round 1 of the quickstart
    (10 clients; with Ray, in 2 actors of a local Ray started for the run), and the
    timeline in between, each mark in seconds from the command: ``imports`` (securefl and
    torch; with Ray on a thread while ``ray.init`` runs, as ``securefl run`` does),
    ``import_ray``, ``ray_init_start``, Ray's own steps inside ``ray.init`` (``ray_gcs_up``,
    ``ray_api_server_up``: the dashboard process Ray waits for even without the dashboard,
    ``ray_raylet_launched``: the raylet and the log monitor started, ``ray_node_registered``:
    the raylet up, once its dashboard and runtime-env agents are, then the driver connects
    and two workers are prestarted) and ``ray_init_end``, ``actors_submitted`` (the
    driver has built the data and asked Ray for the actors), the last actor's
    ``actors_entered`` (placed, its constructor begins), ``actors_imported`` (torch and
    securefl) and ``actors_built`` (its sites), ``actors_ready`` (the driver knows every
    actor is up; meanwhile it built ``[privacy]``, the evaluator and the keys) and
    ``round_1`` (the key exchange and the server built).  With Ray, ``cpu_<kind>``: the CPU
    seconds each kind of process (the driver, the actors, each of Ray's) had used by then
    (with ``psutil``), and ``cpu_total``."""
    t0, line = fresh(STARTUP, "examples/quickstart.toml", backend)
    report = json.loads(line)
    names = {"init": "ray_init_end", "start_hosts": "actors_submitted",
             "RayTransport": "actors_ready"}
    timeline = {names.get(k, k): v - t0 for k, v in report["marks"].items()}
    cpu = {f"cpu_{k.removeprefix('ray::')}": v for k, v in sorted(report["cpu"].items())}
    if cpu:
        cpu["cpu_total"] = sum(cpu.values())
    return {"total": timeline.pop("round_1"), **dict(sorted(timeline.items(),
                                                            key=lambda kv: kv[1])), **cpu}


def startup_medians(runs: int) -> dict[str, dict[str, float]]:
    """The median of each mark of :func:`command_to_round_one` over ``runs`` commands per
    backend, and of ``ray.init`` alone (:data:`RAY_INIT_ALONE`, with securefl's arguments and
    with Ray's defaults), the four commands taking turns."""
    measured: dict[str, list[dict[str, float]]] = {
        "ray": [], "inprocess": [], "ray_init_alone": []}
    for _ in range(runs):
        for backend in ("ray", "inprocess"):
            measured[backend].append(command_to_round_one(backend))
        measured["ray_init_alone"].append({
            args: float(fresh(RAY_INIT_ALONE, args)[1]) for args in ("securefl", "defaults")})
    return {what: {k: round(statistics.median(m[k] for m in rows), 3) for k in rows[0]}
            for what, rows in measured.items()}


def quickstart_startup() -> float:
    from securefl.simulation import build_simulation

    config = load_config("examples/quickstart.toml")
    t0 = time.perf_counter()
    build_simulation(config)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--wire", action="store_true", help="run messages through the codec")
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 100, 1000],
                        help="none (--clients with no value): only the start-up (--backend ray)")
    parser.add_argument("--dims", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--backend", choices=("inprocess", "ray"), default="inprocess")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors (--backend ray)")
    parser.add_argument("--startup-runs", type=int, default=3,
                        help="fresh commands timed for the start-up medians (--backend ray)")
    args = parser.parse_args()
    ray = args.backend == "ray"
    extra = {}
    if ray:  # before this process starts Ray: a fresh command each
        load_before = os.getloadavg()
        medians = startup_medians(args.startup_runs)
        extra = {"load_average_before": load_before, **ray_install(),
                 "ray_startup_seconds": medians["ray"],
                 "inprocess_startup_seconds": medians["inprocess"],
                 "ray_init_alone_seconds": medians["ray_init_alone"],
                 "cpu_count": os.cpu_count(),
                 # the run's CPU work spread perfectly over the cores: no overlap beats it
                 "cpu_floor_seconds": round(medians["ray"]["cpu_total"]
                                            / (os.cpu_count() or 1), 3)
                 if "cpu_total" in medians["ray"] else None,
                 "load_average": os.getloadavg()}
        if not args.clients:
            print(json.dumps(extra))
            return
        start_ray()
    rows = []
    for d in args.dims:
        for n in args.clients:
            seconds, startup = securefl_round_seconds(n, d, args.repeats, args.wire,
                                                      args.backend, args.actors)
            row = {"clients": n, "dimension": d, "wire": args.wire or ray,
                   "backend": args.backend, "actors": args.actors if ray else None,
                   "round_seconds_median": round(seconds, 6),
                   "ms_per_client_round": round(1e3 * seconds / n, 4),
                   "startup_seconds": round(startup, 4)}
            flower = flower_round_seconds(n, d, args.repeats)
            if flower is not None:
                row["flower_ms_per_client_round"] = round(1e3 * flower / n, 4)
                row["flower_over_securefl"] = round(flower / seconds, 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress; stdout: one doc
    print(json.dumps({"quickstart_startup_seconds": round(quickstart_startup(), 4),
                      **extra, "results": rows}))


if __name__ == "__main__":
    main()
