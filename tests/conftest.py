import os

# Without a GPU, Triton kernels run in its interpreter. It must be chosen before anything
# (diffusers, torch._inductor) imports triton, so it is set here, before torch.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_sessionstart(session):
    """Fail at once, with the fix, where Triton's interpreter cannot run (not test by test)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import importlib.metadata

    from packaging.version import Version

    try:
        triton, numpy = (Version(importlib.metadata.version(name)) for name in ("triton", "numpy"))
    except importlib.metadata.PackageNotFoundError:
        return  # no triton: the kernel tests that need it skip with that reason
    if triton < Version("3.7") and numpy >= Version("2.4"):
        pytest.exit(
            f"triton {triton}'s interpreter (the CPU kernel tests) fails with numpy {numpy} "
            "('only 0-dimensional arrays can be converted'): pip install 'triton>=3.7' or 'numpy<2.4'",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


# Tests compare float32 results at 1e-5..1e-6; deterministic single-threaded CPU math keeps
# them fast on the 2-core CI machine too. pytest-xdist's workers share the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

LONGEST_FIRST = ("test_gpu_check.py", "test_parallel_equivalence.py", "test_matrix.py", "test_pipefusion.py",
                 "test_training.py", "test_vae.py", "test_artifacts.py", "test_cli.py")
"""The files that take longest (``--durations``), started first: the suite runs file by file on
pytest-xdist's workers (``-n 2``, ``--dist loadfile``: a file's module fixtures, such as one gloo
launch for many tests, run once), and the long files started last would leave a worker idle."""


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept


SEED_ENV = "VDOPT_TEST_SEED"
"""Set it to replay a failure: every test then seeds with this value instead of a fresh one.
While a test runs it also holds that test's seed, so processes the test starts (the ranks
of ``multirank.run_on_ranks``) seed from it too."""

_SEED_KEY = pytest.StashKey[int]()


def _seed_for_this_test() -> int:
    value = os.environ.get(SEED_ENV)
    if value is not None:
        try:
            return int(value)
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV}={value!r}: use the integer a failure report printed") from None
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture(autouse=True)
def vdopt_seed(request, monkeypatch) -> int:
    """A fresh seed per test (or ``$VDOPT_TEST_SEED``), set on torch and ``random``.

    Random inputs vary from run to run, so tests do not pass by the luck of one draw; a
    failure report says which seed to replay it with.
    """
    seed = _seed_for_this_test()
    request.node.stash[_SEED_KEY] = seed
    random.seed(seed)
    torch.manual_seed(seed)
    monkeypatch.setenv(SEED_ENV, str(seed))  # restored after the test
    return seed


@pytest.fixture
def rng_inputs(vdopt_seed):
    """A generator for random inputs, seeded from the test's seed (never zeros).

    Offset from the global seed so inputs drawn here and weights drawn from torch's global
    generator are not the same numbers.
    """
    return torch.Generator().manual_seed((vdopt_seed + 0x9E3779B9) % 2**63)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"replay with {SEED_ENV}={seed} pytest '{item.nodeid}'"))
    return report
