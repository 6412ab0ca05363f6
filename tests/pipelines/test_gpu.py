"""The GPU path of preprocessing: ImageBind on CUDA agrees with CPU (skipped without a GPU)."""

import numpy as np
import pytest

from pipelines.imagebind import ImageBindEncoder

pytestmark = pytest.mark.gpu


def test_imagebind_on_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(1, 5, 2, 240, 320, 3), dtype=np.uint8)
    cpu = ImageBindEncoder(seed=0, device="cpu").encode_vision(frames)
    gpu = ImageBindEncoder(seed=0, device="cuda").encode_vision(frames)
    assert np.allclose(cpu, gpu, atol=2e-3)
