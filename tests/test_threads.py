"""The worker pool (runtime/threads.c) that the matmuls and attention share their chunks with: a C
driver (tests/c/test_pool.c) runs a stream of tiny jobs through libtinyllm.so's tl_parallel_for and
counts every chunk's runs. A job whose chunks ran twice, ran beyond its count, or were still running
when tl_parallel_for returned shows up in the counts; the driver exits 1 on any."""
import os
import shutil
import subprocess

import pytest

from capi import LIB_PATH
from conftest import ROOT

# enough jobs that a worker arriving late at one job meets the next one being set up many times: the
# old pool ran 97 chunks twice in a million (the first within 200 jobs) on a 2-core machine; about 5 s
JOBS = 1_000_000


@pytest.fixture(scope="module")
def pool_driver(tmp_path_factory):
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) to build tests/c/test_pool.c")
    exe = tmp_path_factory.mktemp("pool") / "test_pool"
    lib_dir = os.path.dirname(os.path.abspath(LIB_PATH))
    subprocess.run([cc, "-std=c11", "-O2", "-pthread", "-I", str(ROOT / "runtime"), "-o", str(exe),
                    str(ROOT / "tests" / "c" / "test_pool.c"), os.path.abspath(LIB_PATH),
                    f"-Wl,-rpath,{lib_dir}"], check=True)
    return exe


def test_every_chunk_of_every_job_runs_once_before_the_job_returns(pool_driver):
    done = subprocess.run([str(pool_driver), str(JOBS), "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"0 faults in {JOBS} jobs" in done.stdout


def test_the_pool_has_no_data_race_under_threadsanitizer(tmp_path):
    """threads.c alone, built with -fsanitize=thread, through the same driver: TSan reports any access to
    the job's fields that no atomic orders (the old pool had three: a late worker reading the next job's
    fields while the caller wrote them)."""
    cc = os.environ.get("CC", "gcc")
    exe = tmp_path / "test_pool_tsan"
    build = subprocess.run([cc, "-std=c11", "-D_GNU_SOURCE", "-O1", "-g", "-pthread", "-fsanitize=thread",
                            "-I", str(ROOT / "runtime"), "-o", str(exe), str(ROOT / "tests" / "c" / "test_pool.c"),
                            str(ROOT / "runtime" / "threads.c")], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"{cc} cannot build with -fsanitize=thread here: {build.stderr.strip()[-200:]}")
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    env.pop("LD_PRELOAD", None)  # not under `make asan-test`'s ASan runtime
    done = subprocess.run([str(exe), "20000", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert "ThreadSanitizer" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 0, done.stdout + done.stderr
