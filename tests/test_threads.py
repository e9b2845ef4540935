"""Thread counts (tinyrefine/threads.py): who decides, BLAS follows, no BLAS threads inside pool workers,
the automatic choice backs off for busy cores. Behaviour only: no timings."""
import threading
import time

import numpy as np
import pytest

import tinyrefine as tr
import tinyrefine.functional as F
from tinyrefine import threads

threadpoolctl = pytest.importorskip("threadpoolctl")


def blas_threads() -> int:
    info = threadpoolctl.threadpool_info()
    counts = {lib["num_threads"] for lib in info if lib["user_api"] == "blas"}
    assert len(counts) == 1, info
    return counts.pop()


@pytest.fixture(autouse=True)
def restore_setting(monkeypatch):
    for name in threads.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    yield
    threads.set_num_threads(None)


def test_set_num_threads_sets_blas_and_the_getter():
    for n in (1, 2, 3):
        tr.set_num_threads(n)
        assert tr.get_num_threads() == n
        assert blas_threads() == n


def test_the_context_manager_restores_the_previous_setting():
    tr.set_num_threads(3)
    with tr.num_threads(1):
        assert tr.get_num_threads() == 1 and blas_threads() == 1
    assert tr.get_num_threads() == 3 and blas_threads() == 3


def test_environment_variables_win_over_the_automatic_choice(monkeypatch):
    monkeypatch.setattr(threads, "_automatic", lambda: 7)
    assert tr.get_num_threads() == 7
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert tr.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")             # before OPENBLAS_NUM_THREADS in the order
    assert tr.get_num_threads() == 3
    monkeypatch.setenv("TINYREFINE_NUM_THREADS", "1")      # ours first
    assert tr.get_num_threads() == 1 and blas_threads() == 1
    tr.set_num_threads(2)                                   # and the call over all of them
    assert tr.get_num_threads() == 2 and blas_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_a_bad_count_is_refused(bad):
    with pytest.raises(ValueError, match="set_num_threads"):
        tr.set_num_threads(bad)


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("TINYREFINE_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="TINYREFINE_NUM_THREADS='many'"):
        tr.get_num_threads()
    monkeypatch.delenv("TINYREFINE_NUM_THREADS")


def test_pool_workers_run_blas_on_one_thread():
    """n plane-pool workers x n BLAS threads each would oversubscribe the cores."""
    seen = []

    def work(a, b):
        seen.append((threading.current_thread().name, blas_threads()))
        np.ones((64, 64)) @ np.ones((64, 64))

    with tr.num_threads(2):
        F.over_planes(8, work, plane_size=1 << 20)
        assert blas_threads() == 2                          # restored for the caller
    assert len(seen) == 8                                            # every range once
    caller = threading.current_thread().name
    assert {name for name, _ in seen} <= {caller} | {f"tinyrefine_{i}" for i in range(8)}   # the caller and the pool
    assert {n for _, n in seen} == {1}                             # BLAS at one thread in all of them


def test_one_thread_runs_the_planes_inline():
    names = []
    with tr.num_threads(1):
        F.over_planes(8, lambda a, b: names.append(threading.current_thread().name), plane_size=1 << 20)
    assert names == [threading.current_thread().name]


class FakeClock:
    """Wall time, our CPU time and the busy seconds /proc/stat would report, moved by hand."""

    def __init__(self):
        self.wall = self.ours = self.busy = 100.0

    def advance(self, seconds, own_cores, other_cores):
        self.wall += seconds
        self.ours += seconds * own_cores
        self.busy += seconds * (own_cores + other_cores)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(threads.time, "monotonic", lambda: fake.wall)
    monkeypatch.setattr(threads.time, "process_time", lambda: fake.ours)
    monkeypatch.setattr(threads.time, "sleep", lambda s: fake.advance(s, 0, 0))
    monkeypatch.setattr(threads, "_busy_seconds_on_our_cores", lambda: fake.busy)
    monkeypatch.setattr(threads, "_last_sample", (fake.wall, fake.busy, fake.ours))
    monkeypatch.setattr(threads, "cores_available", lambda: 2)
    monkeypatch.setattr(threads, "_auto_threads", None)
    monkeypatch.setattr(threads, "_last_check", -float("inf"))
    return fake


def test_our_own_cpu_time_is_not_counted_as_busy(clock):
    clock.advance(1.0, own_cores=2, other_cores=0)
    assert threads.busy_cores_elsewhere() == pytest.approx(0.0)
    clock.advance(1.0, own_cores=1, other_cores=1)
    assert threads.busy_cores_elsewhere() == pytest.approx(1.0)


def test_the_automatic_count_backs_off_for_a_busy_neighbour_and_comes_back(clock):
    clock.advance(1.0, own_cores=0, other_cores=0.1)
    assert tr.get_num_threads() == 2
    clock.advance(1.0, own_cores=1, other_cores=1)          # a neighbour starts: not seen before the recheck
    assert tr.get_num_threads() == 2
    clock.advance(threads.RECHECK_SECONDS, own_cores=1, other_cores=1)
    assert tr.get_num_threads() == 1 and blas_threads() == 1
    clock.advance(threads.RECHECK_SECONDS, own_cores=1, other_cores=5)   # never below 1
    assert tr.get_num_threads() == 1
    clock.advance(threads.RECHECK_SECONDS, own_cores=1, other_cores=0.4)  # a core 40% used is not free
    assert tr.get_num_threads() == 1
    clock.advance(threads.RECHECK_SECONDS, own_cores=2, other_cores=0)   # it stopped
    assert tr.get_num_threads() == 2 and blas_threads() == 2


def test_the_first_look_waits_for_a_measurable_interval(clock):
    threads._last_sample = (clock.wall, clock.busy, clock.ours)       # just imported
    clock.advance(0.0, own_cores=0, other_cores=0)
    threads.busy_cores_elsewhere(min_interval=0.1)
    assert clock.wall == pytest.approx(100.1)


def test_convolutions_give_the_same_result_on_one_and_two_threads():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 24, 80, 72)).astype(np.float32)   # large enough for the plane pool
    w = rng.standard_normal((8, 24, 3, 3)).astype(np.float32)

    def run():
        xt, wt = tr.Tensor(x, requires_grad=True), tr.Tensor(w, requires_grad=True)
        y = F.conv2d(xt, wt, padding=1, stride=2)
        y.backward(np.ones(y.shape, np.float32))
        return y.data, xt.grad, wt.grad

    with tr.num_threads(1):
        single = run()
    with tr.num_threads(2):
        double = run()
    for a, b in zip(single, double):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)   # BLAS may sum in another order on 2 threads


def test_over_ranges_covers_every_range_once_in_order_and_reraises():
    from tinyrefine.functional.common import over_ranges
    with tr.num_threads(2):
        assert over_ranges(10, lambda a, b: list(range(a, b)), 4, 2) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
        finished = []

        def work(a, b):
            if a == 0:
                raise ValueError("range 0 failed")
            finished.append(a)
        with pytest.raises(ValueError, match="range 0 failed"):
            over_ranges(6, work, 6, 2)
        count = len(finished)
        time.sleep(0.05)
        assert len(finished) == count and len(set(finished)) == count   # no worker still running, none ran twice
