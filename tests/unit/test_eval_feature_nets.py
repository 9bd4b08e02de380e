"""Feature networks: the cached evaluation CNN and pytorch-fid's Inception-v3 built without torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpimages.data import ImageData
from dpimages.errors import InputError
from dpimages.eval import feature_nets as features
from dpimages.eval.inception import FIDInceptionV3, load_fid_inception


def _tiny(seed: int, n: int = 400) -> ImageData:
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    images = (rng.integers(0, 40, (n, 28, 28, 1)) + 20 * labels[:, None, None, None]).astype(np.uint8)
    return ImageData(images, labels, [str(i) for i in range(10)], f"tiny{seed}")


def test_eval_net_is_trained_once_cached_and_named(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("DPIMAGES_CACHE", str(tmp_path))
    monkeypatch.setitem(features.EVAL_NET_SETTINGS, "epochs", 1)
    data = _tiny(0)
    net = features.eval_feature_net(data)
    key = features.eval_net_key(data)
    assert net.name == f"evalcnn-v{features.EVAL_NET_VERSION}-{key[:8]}"
    assert (tmp_path / "evalnet" / key / "model.safetensors").exists()
    assert net.info["data_fingerprint"] == data.fingerprint and len(net.info["weights_sha256"]) == 64
    f1 = net(data.images[:50])
    assert f1.shape == (50, features.FEATURE_DIM) and np.isfinite(f1).all()

    def refuse(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the cached network must not be retrained")

    monkeypatch.setattr(features, "train_eval_net", refuse)
    again = features.eval_feature_net(data)
    assert again.name == net.name
    np.testing.assert_allclose(again(data.images[:50]), f1, rtol=1e-5, atol=1e-5)
    ref = again.reference_features(data)
    assert ref.shape == (len(data), features.FEATURE_DIM)
    assert list((tmp_path / "evalnet" / key).glob("ref-*.npy"))


def test_cache_key_depends_on_data_and_code_version(monkeypatch) -> None:  # noqa: ANN001
    a, b = _tiny(0), _tiny(1)
    assert features.eval_net_key(a) != features.eval_net_key(b)
    k = features.eval_net_key(a)
    monkeypatch.setattr(features, "EVAL_NET_VERSION", features.EVAL_NET_VERSION + 1)
    assert features.eval_net_key(a) != k


def test_cache_dir_default_and_env(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.delenv("DPIMAGES_CACHE", raising=False)
    assert str(features.cache_dir()).endswith(".cache/dpimages")
    monkeypatch.setenv("DPIMAGES_CACHE", str(tmp_path))
    assert features.cache_dir() == tmp_path


def test_inception_state_dict_has_pytorch_fid_names() -> None:
    sd = FIDInceptionV3().state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7a.branch7x7x3_4.conv.weight",
                "Mixed_7c.branch3x3dbl_3b.bn.running_mean"):
        assert key in sd
    assert tuple(sd["fc.weight"].shape) == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_inception_matches_torchvision_layout_when_available() -> None:
    tv = pytest.importorskip("torchvision")
    ref = tv.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    ours = FIDInceptionV3().state_dict()
    assert set(ref) == set(ours)
    assert all(tuple(ref[k].shape) == tuple(ours[k].shape) for k in ref)


def test_inception_weights_from_a_path(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("DPIMAGES_CACHE", str(tmp_path / "cache"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sd = FIDInceptionV3().state_dict()
    path = tmp_path / "pt_inception.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    net, sha = load_fid_inception(path)
    assert len(sha) == 64
    fnet = features.inception_feature_net(path)
    assert fnet.name == f"inception-v3-pytorch-fid-{sha[:8]}" and not fnet.name.startswith("evalcnn")
    out = fnet(np.zeros((2, 28, 28, 1), np.uint8))
    assert out.shape == (2, 2048) and np.isfinite(out).all()


def test_inception_refuses_wrong_files(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(InputError, match="file not found"):
        load_fid_inception(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(InputError, match="not pytorch-fid Inception-v3 weights"):
        load_fid_inception(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(InputError, match="not a readable state dict"):
        load_fid_inception(junk)
