"""FID: the Fréchet distance against closed forms, the Inception port's weights file format, and
FID of image sets (a random-init network at a small input size: the maths, not the real weights)."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sample import fid

# pytorch-fid's pt_inception-2015-12-05 state dict: torchvision Inception3 names, fc to 1008 classes, no AuxLogits.
EXPECTED_KEYS = [
    "Conv2d_1a_3x3.conv.weight",
    "Conv2d_1a_3x3.bn.running_var",
    "Mixed_5b.branch5x5_2.conv.weight",
    "Mixed_6a.branch3x3.conv.weight",
    "Mixed_6e.branch7x7dbl_5.bn.bias",
    "Mixed_7a.branch7x7x3_4.conv.weight",
    "Mixed_7c.branch3x3dbl_3b.bn.running_mean",
    "fc.weight",
    "fc.bias",
]


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(3), rng.standard_normal(3)
    a = rng.standard_normal((3, 3))
    sigma = a @ a.T + np.eye(3)
    # Same covariance: only the means differ.
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float((mu1 - mu2) @ (mu1 - mu2)), rel=1e-8)
    # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2.
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = float((mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())
    assert fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-8)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    assert fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(5.0)


def test_frechet_distance_of_singular_covariances_is_finite():
    feats = np.random.default_rng(1).standard_normal((5, 20))  # 5 samples in 20-d: rank-deficient covariance
    mu, sigma = fid.statistics(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert np.isfinite(fid.frechet_distance(mu, sigma, mu + 1, sigma * 2))


def test_inception_keys_are_pytorch_fids_and_load_from_pth_and_safetensors(tmp_path):
    model = fid.FIDInception()
    state = model.state_dict()
    assert all(key in state for key in EXPECTED_KEYS)
    assert not any("AuxLogits" in key for key in state) and state["fc.weight"].shape == (1008, 2048)
    # Ported weights carry no BatchNorm step counters; they must still load.
    plain = {k: v.clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(plain, tmp_path / "inception.pth")
    save_file(plain, tmp_path / "inception.safetensors")
    for name in ("inception.pth", "inception.safetensors"):
        loaded = fid.load_inception(tmp_path / name).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in plain.items())

    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not pytorch-fid's Inception"):
        fid.load_inception(tmp_path / "other.pth")


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_pickled_object_in_the_weights_file_is_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(1), "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused to unpickle"):
        fid.read_state_dict(tmp_path / "evil.pth")


def test_fid_from_features_equals_the_distance_of_the_fitted_gaussians():
    rng = np.random.default_rng(2)
    for n1, n2 in ((5, 7), (40, 30)):  # fewer samples than dimensions (the SVD route), and more
        a, b = rng.standard_normal((n1, 24)), rng.standard_normal((n2, 24)) * 1.5 + 0.3
        expected = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
        assert fid.fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
        assert fid.fid_from_features(a, a) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        fid.fid_from_features(a[:1], b)


def images(seed: int, count: int, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (count, 32, 32, 3)) + shift, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def small_inception():
    """Random weights whose activations do not vanish with depth (He init), at 75 px, the smallest input it takes."""
    torch.manual_seed(0)
    model = fid.FIDInception(resize=75).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


def test_fid_of_a_set_against_itself_is_zero_and_against_another_set_positive(small_inception):
    a = fid.features(small_inception, images(0, 6))
    assert a.shape == (6, 2048) and a.std() > 1e-3
    np.testing.assert_array_equal(fid.features(small_inception, images(0, 6)), a)  # deterministic
    b = fid.features(small_inception, images(1, 6, shift=55))
    assert abs(fid.fid_from_features(a, a)) < 1e-9 * (a**2).sum()
    assert fid.fid_from_features(a, b) > 1e-3 * (a**2).sum() / len(a)


def test_reference_images_from_a_folder_and_a_tar(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    with tarfile.open(tmp_path / "ref.tar", "w") as archive:
        for index, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
            buffer = io.BytesIO()
            Image.new("RGB", (40, 20), colour).save(buffer, format="PNG")
            (folder / f"{index}.png").write_bytes(buffer.getvalue())
            info = tarfile.TarInfo(f"{index:05d}.png")
            info.size = len(buffer.getvalue())
            archive.addfile(info, io.BytesIO(buffer.getvalue()))
        archive.addfile(tarfile.TarInfo("00000.txt"), io.BytesIO(b""))
    (folder / "notes.txt").write_text("not an image")
    for source in (folder, tmp_path / "ref.tar"):
        read = fid.read_reference_images(str(source), count=2, size=16)
        assert read.shape == (2, 16, 16, 3) and read.dtype == np.uint8
        assert tuple(read[0, 8, 8]) == (255, 0, 0) and tuple(read[1, 8, 8]) == (0, 255, 0)
    with pytest.raises(FileNotFoundError):
        fid.read_reference_images(str(tmp_path / "missing"), 2, 16)
