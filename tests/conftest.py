import os

# Without a GPU, Triton kernels run in its interpreter. It must be chosen before anything
# (diffusers, torch._inductor) imports triton, so it is set here, before torch.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests compare float32 results at 1e-5..1e-6; deterministic single-threaded CPU math keeps
# them fast on the 2-core CI machine too.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng_inputs():
    """Fresh random inputs per test: a new seed every call (never zeros)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
