"""Test setup: the Triton kernels run on CPU through Triton's interpreter.

The variable must be set before triton is imported anywhere. Each run draws fresh random inputs;
the seed is printed so a failure can be replayed with ``BLASST_TEST_SEED=<seed>``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("BLASST_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"{request.node.name}: BLASST_TEST_SEED={seed}")
    gen = torch.Generator().manual_seed(seed)
    random.seed(seed)
    return gen


@pytest.fixture(scope="module")
def smollm2():
    """The real embedded model on CPU, ``(model, tokenizer)``; torch on one thread meanwhile (the
    reference's many small ops run fastest there, and robustly on a busy machine)."""
    from blasst_sglang.model import load_smollm2

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_smollm2()
    torch.set_num_threads(old)
