"""Config resolution and run directories."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from dpimages.config import MethodConfig, parse_overrides, resolve_config
from dpimages.errors import InputError
from dpimages.runs import (
    Run,
    load_optimizer,
    optimizer_tensors,
    prefixed,
    rng_state,
    set_rng_state,
    unprefixed,
)


@dataclasses.dataclass
class ToyConfig(MethodConfig):
    steps: int = 10
    lr: float = 1e-3
    channels: list[int] = dataclasses.field(default_factory=lambda: [8, 16])
    use_ema: bool = True
    name: str | None = None
    presets = {"smoke": {"steps": 2}, "cpu": {"steps": 100, "lr": 3e-4}}


def test_preset_yaml_and_overrides_in_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.01\nchannels: [4, 4, 8]\n")
    c = resolve_config(ToyConfig, "cpu", ["steps=7", "use_ema=false", "name=none"], y)
    assert (c.steps, c.lr, c.channels, c.use_ema, c.name) == (7, 0.01, [4, 4, 8], False, None)
    assert resolve_config(ToyConfig, "smoke").steps == 2
    assert resolve_config(ToyConfig, None, ["channels=1,2"]).channels == [1, 2]


@pytest.mark.parametrize(
    ("preset", "overrides", "yaml_text", "needle"),
    [
        ("huge", [], None, "unknown preset"),
        (None, ["stepz=3"], None, "unknown config key 'stepz'"),
        (None, ["steps=abc"], None, "steps must be int"),
        (None, ["steps"], None, "key=value"),
        (None, [], "lr: [1, 2\n", "invalid YAML"),
        (None, [], "- a\n- b\n", "mapping"),
        (None, [], "bogus: 1\n", "unknown config key"),
    ],
)
def test_config_errors(tmp_path, preset, overrides, yaml_text, needle):
    y = None
    if yaml_text is not None:
        y = tmp_path / "c.yaml"
        y.write_text(yaml_text)
    with pytest.raises(InputError, match=needle):
        resolve_config(ToyConfig, preset, overrides, y)


@pytest.mark.parametrize("method", ["dp-mepf", "pe"])
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["features=imagenet"], "features must be one of random, public, path"),
        (["features=path"], "features=path needs feature_path"),
        (["features=random", "feature_path=w.safetensors"], "feature_path is only used with features=path"),
    ],
)
def test_feature_source_errors_are_shared_by_the_methods_that_take_features(method, overrides, needle):
    from dpimages.api import create

    with pytest.raises(InputError, match=needle):
        create(method, "smoke", **parse_overrides(overrides))


def test_run_refuses_reuse_and_changed_resume(tmp_path):
    run = Run(tmp_path / "r")
    cfg = {"method": "x", "config": {"steps": 1}}
    run.start(cfg, resume=False)
    with pytest.raises(InputError, match="not empty"):
        Run(tmp_path / "r").start(cfg, resume=False)
    with pytest.raises(InputError, match="privacy.json is missing"):  # no ledger: what was spent is unknown
        Run(tmp_path / "r").start(cfg, resume=True)
    run.privacy_path.write_text("{}")
    Run(tmp_path / "r").start(cfg, resume=True)
    with pytest.raises(InputError, match="config"):
        Run(tmp_path / "r").start({**cfg, "config": {"steps": 2}}, resume=True)
    with pytest.raises(InputError, match="no run to resume"):
        Run(tmp_path / "other").start(cfg, resume=True)


def test_keyed_data_check_refuses_other_data_and_has_no_unkeyed_fingerprint(tmp_path):
    """The data check is an HMAC under a random key kept in checkpoints/; another data set is refused."""
    from dpimages.data import ImageData

    images = np.zeros((6, 8, 8, 1), np.uint8)
    data = ImageData(images, np.arange(6) % 2, ["a", "b"], "d")
    other = ImageData(images, (np.arange(6) + 1) % 2, ["a", "b"], "d")  # same pixels, other labels
    run = Run(tmp_path / "r")
    run.start({"method": "x"}, resume=False)
    run.write_data_check(data.keyed_digest)
    run.verify_data_check(data.keyed_digest)
    with pytest.raises(InputError, match="different data set"):
        run.verify_data_check(other.keyed_digest)
    stored = json.loads(run.data_check_path.read_text())
    assert run.data_check_path.parent == run.checkpoint_dir
    assert data.fingerprint.removeprefix("sha256:") not in json.dumps(stored)
    again = Run(tmp_path / "r2")
    again.start({"method": "x"}, resume=False)
    again.write_data_check(data.keyed_digest)  # a fresh key per run: the two checks differ
    assert json.loads(again.data_check_path.read_text())["hmac"] != stored["hmac"]
    run.data_check_path.unlink()
    with pytest.raises(InputError, match="data-check.json is missing"):
        run.verify_data_check(data.keyed_digest)


def test_checkpoint_roundtrip_safetensors_only(tmp_path):
    run = Run(tmp_path / "r")
    run.start({"method": "x"}, resume=False)
    assert run.load_checkpoint() is None
    run.save_checkpoint({"w": torch.arange(6.0).reshape(2, 3)}, {"step": 3, "note": "a"})
    run.save_checkpoint({"w": torch.ones(2, 3)}, {"step": 5})
    tensors, state = run.load_checkpoint()
    assert torch.equal(tensors["w"], torch.ones(2, 3)) and state["step"] == 5
    files = sorted(p.name for p in run.checkpoint_dir.iterdir())
    assert files == ["model-00000005.safetensors", "state.json"]
    run.log(1, noisy_grad_norm=0.5)
    assert run.read_metrics()[0]["noisy_grad_norm"] == 0.5


def test_checkpoint_parts_roundtrip_through_safetensors_and_json(tmp_path):
    """Module, optimizer and generator states survive save_checkpoint/load_checkpoint (no pickle)."""
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(5)
    opt_tensors, groups = optimizer_tensors("opt", opt)
    assert sorted(opt_tensors) == [f"opt.{i}.{k}" for i in (0, 1) for k in ("exp_avg", "exp_avg_sq", "step")]
    run = Run(tmp_path / "r")
    run.start({"method": "x"}, resume=False)
    run.save_checkpoint({**prefixed("net", net.state_dict()), **opt_tensors},
                        {"step": 1, "optimizer": groups, "rng": rng_state(g)})
    expected = torch.rand(3, generator=g)
    tensors, state = run.load_checkpoint()
    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(unprefixed("net", tensors))
    opt2 = torch.optim.Adam(net2.parameters(), lr=1.0)
    load_optimizer("opt", opt2, tensors, state["optimizer"], torch.device("cpu"))
    assert torch.equal(net2.weight, net.weight) and opt2.param_groups[0]["lr"] == 1e-2
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    g2 = torch.Generator()
    set_rng_state(g2, state["rng"])
    assert torch.equal(torch.rand(3, generator=g2), expected)
    assert unprefixed("other", tensors) == {}


def test_non_writer_run_writes_nothing_but_reads(tmp_path):
    """The other ranks of a process group hold Run(writer=False): every write is a no-op, reads work."""
    writer, reader = Run(tmp_path / "r"), Run(tmp_path / "r", writer=False)
    Run(tmp_path / "other", writer=False).start({"a": 1}, resume=False)
    assert not (tmp_path / "other").exists()
    writer.start({"a": 1}, resume=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    reader.start({"a": 2}, resume=True)  # no check either: rank 0 checks and tells the others
    reader.log(1, x=1.0)
    reader.save_checkpoint({"w": torch.ones(2)}, {"step": 1})
    reader.write_report("text")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    writer.save_checkpoint({"w": torch.ones(2)}, {"step": 1})
    tensors, state = reader.load_checkpoint()
    assert state["step"] == 1 and torch.equal(tensors["w"], torch.ones(2))
    assert reader.read_config()["a"] == 1


def _agree_worker(rank: int, port: int, values: list[str], out: str) -> None:
    import torch.distributed as dist

    from dpimages.distributed import same_on_all_ranks
    from dpimages.errors import InputError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(values))
    try:
        same_on_all_ranks(values[rank], "the private data")
        result = "ok"
    except InputError as e:
        result = str(e)
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(result)


def test_every_rank_refuses_when_one_rank_reads_other_data(tmp_path) -> None:  # noqa: ANN001
    import socket

    import torch.multiprocessing as mp

    for values, expect_ok in ((["fp-a", "fp-a"], True), (["fp-a", "fp-b"], False)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = str(tmp_path / f"r{expect_ok}")
        mp.spawn(_agree_worker, args=(port, values, out), nprocs=2, join=True)
        results = [open(f"{out}.{r}").read() for r in range(2)]
        if expect_ok:
            assert results == ["ok", "ok"]
        else:  # both ranks stop with the same one-line error, none trains on its own data
            assert results[0] == results[1] and "the private data differs between processes (1 of 2" in results[0]


def test_presets_scale_their_image_sized_keys_to_larger_images_and_keep_what_the_user_sets():
    """A 128x128 image has 21x the pixels of a 28x28 one: the image-sized keys of a preset shrink by that much (never
    below their floor, never above the preset), a KEY=VALUE the user gives is kept, 28x28 changes nothing."""
    from dpimages.config import area_scale, resolve_config
    from dpimages.registry import method_class

    cfg = method_class("dpdm").Config
    base = resolve_config(cfg, "cpu")
    assert resolve_config(cfg, "cpu", image_shape=(28, 28, 1)) == base and area_scale((28, 28, 1)) == 1.0
    big = resolve_config(cfg, "cpu", image_shape=(128, 128, 3))
    assert big.batch_size == round(2400 * 784 / 16384) and big.warm_images == round(60000 * 784 / 16384)
    assert big.multiplicity == base.multiplicity and big.epochs == base.epochs  # not image-sized
    assert resolve_config(cfg, "cpu", ["batch_size=300"], image_shape=(128, 128, 3)).batch_size == 300
    smoke = resolve_config(cfg, "smoke", image_shape=(128, 128, 3))
    assert smoke.batch_size == 16 and smoke.multiplicity == 1 and smoke.warm_images == 64  # floors; never above


def test_a_long_loop_prints_one_time_estimate_from_its_first_steps(capsys, monkeypatch):
    from dpimages.methods import training

    clock = iter([0.0, 30.0, 31.0, 32.0])
    monkeypatch.setattr(training.time, "time", lambda: next(clock))
    est = training.TimeEstimate(100, 0, "demo steps", after_s=20.0, min_steps=3)  # start at t=0
    est.update(3)  # 3 steps in 30 s: 97 steps left, about 16 min
    est.update(4)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["demo steps: about 16 min for the 97 steps left (measured over the first 3)"]
    short = training.TimeEstimate(5, 0, "short", after_s=0.0, min_steps=1)  # t=31: 1 step in 1 s, 4 left: no line
    short.update(1)
    assert capsys.readouterr().err == ""
