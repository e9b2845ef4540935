"""memory.retain_freed_memory (issue 13): glibc keeps what a step frees for the next step. Checked in a child
process, since the setting is process-wide: the page faults of a step-like pattern of allocations, before and
after; its arguments; and that the CLI asks for it."""
import subprocess
import sys
import textwrap

import pytest

import tinyrefine as tr
from tinyrefine import cli
from tinyrefine.memory import GLIBC_MAX_MMAP_THRESHOLD, glibc_mallopt, retain_freed_memory

STEP_PATTERN = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from tinyrefine.memory import retain_freed_memory

    def faults_of_five_steps():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):   # a "step": 20 arrays of 2 MiB written, then all freed (as a graph's activations)
            arrays = [np.ones(256 * 1024) for _ in range(20)]
            del arrays
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_five_steps()
    default = faults_of_five_steps()
    took = retain_freed_memory()
    faults_of_five_steps()
    print(default, faults_of_five_steps(), took)
""")


@pytest.mark.skipif(glibc_mallopt() is None, reason="retain_freed_memory acts on glibc's malloc only (Linux)")
def test_retained_memory_is_not_faulted_in_again_at_every_step():
    out = subprocess.run([sys.executable, "-c", STEP_PATTERN], capture_output=True, text=True, check=True).stdout
    default, retained, took = out.split()
    default, retained = int(default), int(retained)
    if default < 1000:
        pytest.skip(f"this process's malloc already keeps freed memory ({default} faults in five steps)")
    assert took == "True"
    assert retained < default / 10, (default, retained)   # 2 MiB of fresh pages is 512 faults


@pytest.mark.parametrize("kwargs, words", [
    (dict(mmap_threshold=0), "mmap_threshold must be a positive"),
    (dict(trim_threshold=True), "trim_threshold must be a positive"),
    (dict(mmap_threshold=GLIBC_MAX_MMAP_THRESHOLD + 1), "above glibc's largest"),
    (dict(trim_threshold=1 << 31), "does not fit"),
])
def test_retain_freed_memory_names_a_bad_argument(kwargs, words):
    with pytest.raises(ValueError, match=words):
        retain_freed_memory(**kwargs)


def test_the_cli_retains_freed_memory_before_it_runs(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True))
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "missing.npz")]) == 2   # fails after the call
    assert calls == [True]
    assert "missing.npz" in capsys.readouterr().err


def test_it_is_part_of_the_public_api():
    assert tr.retain_freed_memory is retain_freed_memory
