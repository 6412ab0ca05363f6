from __future__ import annotations

import numpy as np
import pytest

from pipelines.fusion import fuse, fused_width


def _batch():
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(3, 4)).astype(np.float32)
    audio *= 20 / np.linalg.norm(audio, axis=1, keepdims=True)  # ImageBind's audio head: unit x 20
    vision = rng.normal(size=(3, 4)).astype(np.float32)
    vision /= np.linalg.norm(vision, axis=1, keepdims=True)
    return audio, vision


def test_mean_l2_weights_modalities_equally():
    audio, vision = _batch()
    a, v, fused = fuse(audio, vision, [1, 1, 1], [1, 1, 1], "mean_l2")
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(fused, (a + v) / 2, rtol=1e-5)
    # neither modality dominates: equal cosine to both
    cos = lambda x, y: (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)  # noqa: E731
    np.testing.assert_allclose(cos(fused, a), cos(fused, v), rtol=1e-5)


def test_sum_raw_is_audio_dominated():
    audio, vision = _batch()
    _, _, fused = fuse(audio, vision, [1, 1, 1], [1, 1, 1], "sum_raw")
    np.testing.assert_allclose(fused, audio + vision, rtol=1e-5)
    cos_audio = (fused * audio).sum(1) / np.linalg.norm(fused, axis=1) / 20
    assert (cos_audio > 0.99).all()


def test_concat_and_missing_modalities():
    audio, vision = _batch()
    a, v, fused = fuse(audio, vision, [1, 0, 1], [1, 1, 0], "concat")
    assert fused.shape == (3, fused_width("concat", 4)) == (3, 8)
    assert np.all(fused[1, :4] == 0) and np.all(fused[2, 4:] == 0)
    _, _, mean = fuse(audio, vision, [1, 0, 0], [1, 1, 0], "mean_l2")
    np.testing.assert_allclose(mean[1], v[1], rtol=1e-5)  # vision alone when audio is missing
    assert np.isnan(mean[2]).all()  # neither: nothing to store
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(audio, vision, [1] * 3, [1] * 3, "average")
