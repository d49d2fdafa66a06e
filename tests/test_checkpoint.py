"""signclip_jax.checkpoint: Orbax save/restore bit-exact, keep latest + best, step directories."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from signclip_jax import checkpoint as ckpt_lib
from signclip_jax.errors import UserError


def _state(step: int):
    params = {
        "model": {"w": jnp.arange(16.0).reshape(4, 4) * step, "b": jnp.ones(4) * step},
        "loss": {},
    }
    train = {"step": jnp.asarray(step, jnp.int32), "mu": {"w": jnp.full((4, 4), 0.5 * step)}}
    return params, train


def _iterator():
    ds = grain.MapDataset.range(100).seed(3).shuffle().batch(4)
    return iter(ds.to_iter_dataset())


def test_save_restore_bit_exact_with_data_iterator(tmp_path):
    params, train = _state(7)
    it = _iterator()
    for _ in range(3):
        next(it)
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, params=params, train_state=train, data_iterator=it, meta={"epoch": 1})
        expected_next = [next(it) for _ in range(2)]
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 7
        fresh = _iterator()
        p, t, meta = ckpt.restore(
            7,
            abstract_params=ckpt_lib.abstract_like(params),
            abstract_train_state=ckpt_lib.abstract_like(train),
            data_iterator=fresh,
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p, params
    )
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), t, train)
    assert meta["epoch"] == 1 and meta["step"] == 7
    for want in expected_next:
        np.testing.assert_array_equal(next(fresh), want)


def test_keeps_latest_and_best(tmp_path):
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 6.0, 5: 7.0}
    with ckpt_lib.Checkpointer(tmp_path, keep=2, keep_best=1) as ckpt:
        for step, loss in losses.items():
            params, train = _state(step)
            ckpt.save(step, params=params, train_state=train, metrics={"val/loss": loss})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4, 5]
        assert ckpt.best_step() == 2
        assert ckpt.latest_step() == 5
    assert ckpt_lib.resolve_step_dir(tmp_path).name == "5"
    assert ckpt_lib.resolve_step_dir(tmp_path, which="best").name == "2"


def test_restore_params_only_onto_other_sharding(tmp_path):
    params, train = _state(3)
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, params=params, train_state=train)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, P("fsdp") if x.ndim else P())
        ),
        params,
    )
    restored = ckpt_lib.restore_params(ckpt_lib.resolve_step_dir(tmp_path), target)
    w = restored["model"]["w"]
    assert w.sharding.spec == P("fsdp")
    np.testing.assert_array_equal(np.asarray(w), np.asarray(params["model"]["w"]))


def test_resolve_step_dir_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoints"):
        ckpt_lib.resolve_step_dir(tmp_path)
    with pytest.raises(UserError, match="not a checkpoint step directory"):
        ckpt_lib.resolve_step_dir(checkpoint=tmp_path)
    with pytest.raises(UserError, match="--workdir"):
        ckpt_lib.resolve_step_dir()


def test_unfinished_step_is_ignored(tmp_path):
    params, train = _state(1)
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, params=params, train_state=train)
    # What a run killed mid-write leaves: a temporary step directory without the commit marker.
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123").mkdir()
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1


def test_relative_workdir(tmp_path, monkeypatch):
    """Orbax refuses relative paths; `--workdir=runs/demo` must still work."""
    monkeypatch.chdir(tmp_path)
    params = {"w": jnp.arange(4.0)}
    with ckpt_lib.Checkpointer("runs/x", async_save=False) as ckpt:
        ckpt.save(3, params=params, train_state={"step": jnp.int32(3)}, force=True)
    step_dir = ckpt_lib.resolve_step_dir("runs/x")
    assert step_dir == tmp_path / "runs" / "x" / "checkpoints" / "3"
    relative = ckpt_lib.resolve_step_dir(checkpoint="runs/x/checkpoints/3")
    restored = ckpt_lib.restore_params(relative, ckpt_lib.abstract_like(params))
    assert restored["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_damaged_step_is_one_error_and_restore_latest_falls_back(tmp_path, caplog):
    with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2):
            params, train = _state(step)
            ckpt.save(step, params=params, train_state=train, force=True)
    params, train = _state(0)
    abstract = {"abstract_params": ckpt_lib.abstract_like(params),
                "abstract_train_state": ckpt_lib.abstract_like(train)}  # fmt: skip
    step_dir = tmp_path / "checkpoints" / "2"
    # Files written by this process may still be in tensorstore's cache: the manifest too.
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and ("ocdbt" in str(f.relative_to(step_dir)) or f.parent.name == "d"):
            f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ckpt_lib.DamagedCheckpoint) as info:
        ckpt_lib.restore_params(step_dir, abstract["abstract_params"])
    message = str(info.value)
    assert message.startswith(f"{step_dir}: damaged checkpoint") and "\n" not in message
    assert f"--checkpoint={tmp_path / 'checkpoints' / '1'}" in message
    with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(ckpt_lib.DamagedCheckpoint):
            ckpt.restore(2, **abstract)
        step, p, _, _ = ckpt.restore_latest(**abstract)
        assert step == 1 and ckpt.all_steps() == [1]
        np.testing.assert_array_equal(np.asarray(p["model"]["w"]), _state(1)[0]["model"]["w"])
        assert "step 2 is damaged: resuming from step 1" in caplog.text
        assert (tmp_path / ckpt_lib.DAMAGED_DIR / "2").exists()
        ckpt.save(2, params=_state(2)[0], train_state=_state(2)[1], force=True)  # saves again
        assert ckpt.all_steps() == [1, 2]
    with ckpt_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2):
            for f in (tmp_path / "checkpoints" / str(step) / "params").rglob("*"):
                if f.is_file() and f.name != "_METADATA":
                    f.write_bytes(b"")
        with pytest.raises(ckpt_lib.DamagedCheckpoint, match="no checkpoint step restores"):
            ckpt.restore_latest(**abstract)
