"""The benchmarks' row cache (ectune.bench.RowCache): two processes running the same benchmark share
its rows, each row is computed once, and a claim left by a killed process is taken over."""

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

def _worker(root: str, names: list[str]) -> None:
    import time
    from ectune.bench import RowCache
    cache = RowCache(Path(root))

    def compute(name):
        with open(Path(root) / "computed.txt", "a") as f:
            f.write(f"{name} {os.getpid()}\n")
        time.sleep(0.3)
        return {"value": float(len(name))}
    for name in names:                          # first pass: skip rows the other process is computing
        cache.get(name, lambda name=name: compute(name), wait=False)
    for name in names:
        assert cache.get(name, lambda name=name: compute(name))["value"] == len(name)


def test_two_processes_compute_each_row_once(tmp_path):
    names = [f"row{i}" for i in range(6)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), names)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lines = (tmp_path / "computed.txt").read_text().split()
    done = lines[0::2]
    assert sorted(done) == sorted(names)        # once each
    assert len(set(lines[1::2])) == 2           # and both processes did some
    assert not list((tmp_path / "rows").glob("*.claim"))


def test_a_live_claim_is_skipped_and_a_dead_one_taken_over(tmp_path):
    from ectune.bench import RowCache
    cache = RowCache(tmp_path)
    (tmp_path / "rows" / "a.claim").write_text(str(os.getpid()))
    assert cache.get("a", lambda: {"value": 1.0}, wait=False) is None
    assert not (tmp_path / "rows" / "a.json").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / "rows" / "b.claim").write_text(dead)
    assert cache.get("b", lambda: {"value": 2.0}, wait=False)["value"] == 2.0
    assert cache.get("b", lambda: {"value": 3.0})["value"] == 2.0      # cached: not computed again
    assert not (tmp_path / "rows" / "b.claim").exists()
