"""Training steps alone and beside a busy process: tinyrefine's thread settings against torch's, in one run.

    python benchmarks/contention.py                          # demo step and R50 step, quiet and busy
    python benchmarks/contention.py --cases demo --steps 10
    python benchmarks/contention.py --compare /tmp/tinyrefine-old   # also an older checkout, same run
    python benchmarks/contention.py --paired 30 --cases demo --loads alone   # steps taken in turns (below)

Issue 13: on a 2-core laptop with a browser busy on one core, BLAS and the plane pool at 2 threads each
ran the demo step 5.6x slower than one thread. Cases (float32, random data, SGD momentum 0.9):
  demo: the README demo's network (ResNet-18 width 16, decoder 32, n_crp 2, BN trained), batch 8, 64x64
  r50:  benchmarks/train_step.py's RefineNet-ResNet-50 (n_crp 4, frozen BN), batch 2, --r50-size
Loads: "alone" (whatever else runs on the machine: the load average is printed) and "busy" (plus one
process spinning a core, as `python -c "while True: pass"`, until this script ends). Settings: tinyrefine automatic (the
library's default), tinyrefine with 1 and 2 threads (set_num_threads), torch's default threads and torch
with 1 thread. Each (case, load, setting) runs in its own process; time per step is the median over
--steps steps after one warm-up step, CPU s/step this process's CPU time per step (all its threads).
Ratios compare settings measured under the same load in this run; with --repeat, each setting's
median run (passes alternate their order, so a load that drifts during the run is shared out).

--paired R: on these shared machines the speed of the whole machine drifts by 10-40% within minutes, more
than the differences measured. Paired mode keeps one live process per setting and has them take steps in
turns: R rounds, each setting --steps steps per round (the order reversed every other round), the others
idle meanwhile. Each round gives each setting its median step and its ratio to torch's default in that same
round; the table shows the median over rounds of both, and the quartiles of the ratio. A drift slower than
a round cancels out of the ratios. The automatic thread count reads the other settings' turns as load and
often backs off to one thread here: in paired mode compare the fixed settings.

tinyrefine's workers do what `python -m tinyrefine` does: memory.retain_freed_memory(), so glibc keeps the
memory a step frees for the next step instead of faulting it in again (torch's workers keep their default).
--heap-ab adds tinyrefine at 1 and 2 threads on glibc's default heap ("glibc heap 1", "glibc heap 2"), as a
script that imports the library without calling it gets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

DEMO = dict(num_classes=4, encoder="resnet18", encoder_width=16, features=32, n_crp=2, cascade=4, freeze_bn=False)
R50 = dict(num_classes=21, encoder="resnet50", n_crp=4, cascade=4, freeze_bn=True)   # train_step.py's CONFIG
LR, MOMENTUM = 1e-3, 0.9
SETTINGS = ["tinyrefine auto", "tinyrefine 1", "tinyrefine 2", "torch default", "torch 1"]
# the busy process: spins one core until its parent is gone (a killed run must not leave a spinner behind)
SPINNER = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass"


def case_shape(case: str, r50_size: int):
    """(model config, batch, crop)"""
    return (DEMO, 8, 64) if case == "demo" else (R50, 2, r50_size)


def make_batch(batch: int, size: int, classes: int):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    target = rng.integers(0, classes, (batch, size, size)).astype(np.int64)
    return images, target


# --------------------------------------------------------------------------- workers
def tinyrefine_step(config: dict, images, target, threads: str, retain_heap: bool = True):
    import tinyrefine as tr
    import tinyrefine.functional as F
    from tinyrefine.models import RefineNet
    from tinyrefine.optim import SGD

    if retain_heap:   # as python -m tinyrefine does (an older checkout may not have it)
        retain = getattr(getattr(tr, "memory", None), "retain_freed_memory", None)
        if retain is not None:
            retain()
    if threads != "auto":
        if hasattr(tr, "set_num_threads"):
            tr.set_num_threads(int(threads))
        # an older checkout without set_num_threads: the driver set OPENBLAS_NUM_THREADS
    model = RefineNet(**config).train()
    optimizer = SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    x = tr.Tensor(images)

    def step() -> float:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), target, ignore_index=255)
        loss.backward()
        optimizer.step()
        return loss.item()

    def threads_used() -> str:
        return str(tr.get_num_threads()) if hasattr(tr, "get_num_threads") else "?"
    return step, threads_used


def torch_step(config: dict, images, target, threads: str):
    import torch
    from tinyrefine.interop.torch_twin import TorchRefineNet

    if threads != "default":
        torch.set_num_threads(int(threads))
    model = TorchRefineNet(**config).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    x, t = torch.from_numpy(images), torch.from_numpy(target)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), t, ignore_index=255)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step, lambda: str(torch.get_num_threads())


def build_step(setting: str, case: str, r50_size: int):
    """The step of a setting ("torch 1", "tinyrefine auto", "old 1", "glibc heap 2", ...) and its thread report."""
    config, batch, size = case_shape(case, r50_size)
    images, target = make_batch(batch, size, config["num_classes"])
    framework, threads = setting.rsplit(" ", 1)
    if framework == "torch":
        return torch_step(config, images, target, threads)
    return tinyrefine_step(config, images, target, threads, retain_heap=framework != "glibc heap")


def paired_worker(args) -> None:
    """Build the step once, then on each line "k" of stdin time k steps and print their times (JSON)."""
    step, _ = build_step(args.worker, args.case, args.r50_size)
    step()                                                            # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


def paired(args, case: str, roots: dict) -> dict:
    """Every setting in its own live process, taking --steps steps in turns for --paired rounds."""
    procs = {}
    for setting, root in roots.items():
        procs[setting] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", setting, "--case", case, "--paired-worker",
             "--r50-size", str(args.r50_size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=worker_env(setting, os.path.abspath(root)), cwd=os.path.abspath(root))
    try:
        for setting, proc in procs.items():
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"paired worker {setting!r} failed to start (exit code {proc.wait()})")
        rounds = {setting: [] for setting in procs}
        for r in range(args.paired):
            for setting in (list(procs) if r % 2 == 0 else list(procs)[::-1]):
                time.sleep(0.1)                                       # let the last one's threads go idle
                procs[setting].stdin.write(f"{args.steps}\n")
                procs[setting].stdin.flush()
                rounds[setting].append(statistics.median(json.loads(procs[setting].stdout.readline())))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    base = rounds["torch default"]
    results = {}
    for setting, times in rounds.items():
        ratios = [t / b for t, b in zip(times, base)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        results[setting] = {"s": statistics.median(times), "ratio": statistics.median(ratios), "q1": q1, "q3": q3}
    return results


def worker(args) -> dict:
    step, threads_used = build_step(args.worker, args.case, args.r50_size)
    walls, cpus = [], []
    for i in range(args.steps + 1):                       # step 0 is the warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        if i:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return {"s": statistics.median(walls), "cpu": statistics.median(cpus), "threads": threads_used()}


# --------------------------------------------------------------------------- driver
def worker_env(setting: str, root: str) -> dict:
    """The environment of a worker process: its checkout first on the path, and for an older checkout without
    set_num_threads a fixed thread count through OPENBLAS_NUM_THREADS (only BLAS can be limited there)."""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    framework, threads = setting.rsplit(" ", 1)
    if framework != "torch" and threads != "auto" and not os.path.exists(os.path.join(root, "tinyrefine", "threads.py")):
        env["OPENBLAS_NUM_THREADS"] = threads
    return env


def spawn(args, case: str, setting: str, root: str) -> dict:
    env = worker_env(setting, root)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", setting, "--case", case,
           "--steps", str(args.steps), "--r50-size", str(args.r50_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load": load_average().split()[0]}


def median_run(runs: list) -> dict:
    """The run with the median s/step of a setting's repeats (an error if any failed), with the load after each."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    chosen = dict(sorted(runs, key=lambda r: r["s"])[(len(runs) - 1) // 2])
    chosen["load"] = ", ".join(r["load"] for r in runs)
    return chosen


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=["demo", "r50"], default=["demo", "r50"])
    parser.add_argument("--loads", nargs="+", choices=["alone", "busy"], default=["alone", "busy"])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps after one warm-up (default: demo 10, r50 2; paired, per round: demo 3, r50 1)")
    parser.add_argument("--r50-size", type=int, default=256)
    parser.add_argument("--compare", metavar="PATH", help="also run this older tinyrefine checkout (auto and 1 thread)")
    parser.add_argument("--heap-ab", action="store_true",
                        help="also run tinyrefine at 1 and 2 threads on glibc's default heap (see above)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting (the median is shown)")
    parser.add_argument("--paired", type=int, metavar="ROUNDS", help="steps in turns, live processes (see above)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--paired-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.paired_worker:
            paired_worker(args)
        else:
            print(json.dumps(worker(args)))
        return

    roots = {setting: ROOT for setting in SETTINGS}
    if args.compare:
        roots.update({"old auto": args.compare, "old 1": args.compare})
    if args.heap_ab:
        roots.update({"glibc heap 1": ROOT, "glibc heap 2": ROOT})
    steps_given = args.steps
    print(f"{os.cpu_count()} cores, python {sys.version.split()[0]}, load average at start {load_average()}")
    if args.paired:
        print(f"paired: {args.paired} rounds; per round each setting takes its steps while the others wait")
        print(f"{'case':<5} {'load':<5} {'setting':<16} {'s/step':>7} {'/torch default':>14} {'quartiles':>13}")
    else:
        print(f"{'case':<5} {'load':<5} {'setting':<16} {'threads':>7} {'s/step':>7} {'CPU s/step':>10} "
              f"{'/torch default':>14} {'/best fixed tinyrefine':>22}  1-min load after each run")
    for case in args.cases:
        args.steps = steps_given or ((3 if args.paired else 10) if case == "demo" else (1 if args.paired else 2))
        for load in args.loads:
            spinner = None
            if load == "busy":
                spinner = subprocess.Popen([sys.executable, "-c", SPINNER])
                time.sleep(1.0)
            if args.paired:
                try:
                    results = paired(args, case, roots)
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
                for setting, r in results.items():
                    print(f"{case:<5} {load:<5} {setting:<16} {r['s']:>7.3f} {r['ratio']:>13.2f}x "
                          f"{r['q1']:>6.2f}-{r['q3']:.2f}", flush=True)
                print(f"load average after: {load_average()}", flush=True)
                continue
            try:
                runs = {setting: [] for setting in roots}
                for r in range(args.repeat):   # every other pass in reverse order, so drifting load hits all alike
                    for setting in (list(roots) if r % 2 == 0 else list(roots)[::-1]):
                        runs[setting].append(spawn(args, case, setting, os.path.abspath(roots[setting])))
                results = {setting: median_run(rs) for setting, rs in runs.items()}
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            torch_s = results["torch default"].get("s")
            fixed = [results[s]["s"] for s in ("tinyrefine 1", "tinyrefine 2") if "s" in results[s]]
            for setting, r in results.items():
                if "error" in r:
                    print(f"{case:<5} {load:<5} {setting:<16} failed: {r['error']}", flush=True)
                    continue
                vs_torch = f"{r['s'] / torch_s:.2f}x" if torch_s else "-"
                vs_best = f"{r['s'] / min(fixed):.2f}x" if fixed and setting.startswith(("tinyrefine", "old")) else ""
                print(f"{case:<5} {load:<5} {setting:<16} {r['threads']:>7} {r['s']:>7.3f} {r['cpu']:>10.3f} "
                      f"{vs_torch:>14} {vs_best:>22}  {r['load']}", flush=True)


if __name__ == "__main__":
    main()
