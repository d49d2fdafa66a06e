"""Mesh creation, logical partitioning rules on a fake NNX model, and batch sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from signclip_jax.errors import UserError
from signclip_jax.train import sharding


class FakeModel(nnx.Module):
    """Parameters annotated the way the real model is: `logical_axes` metadata per Param."""

    def __init__(self):
        def param(shape, axes=None):
            value = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
            return nnx.Param(value) if axes is None else nnx.Param(value, logical_axes=axes)

        self.word_emb = param((32, 16), ("vocab", "embed"))
        self.frame_in = param((12, 16), ("pose_in", "embed"))
        self.mlp_in = param((16, 40), ("embed", "mlp"))
        self.mlp_out = param((40, 16), ("mlp", "embed"))
        self.query = param((16, 16), ("embed", "heads"))
        self.odd = param((12, 40), ("embed", "mlp"))  # 12 splits 2 ways, not 8
        self.odd_vec = param((6,), ("embed",))  # nothing to fall back to
        self.proj = param((16, 8), ("embed", "embed_out"))
        self.bias = param((16,))  # unannotated
        self.layers = nnx.List([FakeLayer()])


class FakeLayer(nnx.Module):
    def __init__(self):
        self.norm = nnx.Param(jnp.ones((16,)), logical_axes=("embed",))


# Expected specs, per mesh: (shape, axis names) -> {param: spec}.
EXPECTED = {
    "data8": (
        ((8,), ("data",)),
        {
            "word_emb": P(None, None),
            "mlp_in": P(None, None),
            "odd": P(None, None),
            "bias": P(None),
        },
    ),
    "fsdp8": (
        ((8,), ("fsdp",)),
        {
            "word_emb": P(None, "fsdp"),
            "frame_in": P(None, "fsdp"),
            "mlp_in": P("fsdp", None),
            "mlp_out": P(None, "fsdp"),
            "query": P("fsdp", None),
            "odd": P(None, "fsdp"),  # 12 % 8 != 0: fsdp falls back to the 40-wide dim
            "odd_vec": P(None),  # 6 % 8 != 0 and no other dim: replicated
            "proj": P("fsdp", None),
            "bias": P(None),
        },
    ),
    "data4_fsdp2": (
        ((4, 2), ("data", "fsdp")),
        {
            "word_emb": P(None, "fsdp"),
            "mlp_in": P("fsdp", None),
            "odd": P("fsdp", None),
            "odd_vec": P("fsdp"),
            "proj": P("fsdp", None),
            "bias": P(None),
        },
    ),
    "data2_fsdp2_model2": (
        ((2, 2, 2), ("data", "fsdp", "model")),
        {
            "word_emb": P("model", "fsdp"),
            "frame_in": P(None, "fsdp"),
            "mlp_in": P("fsdp", "model"),
            "mlp_out": P("model", "fsdp"),
            "query": P("fsdp", "model"),
            "odd": P("fsdp", "model"),
            "proj": P("fsdp", "model"),
            "bias": P(None),
        },
    ),
}


def _specs(tree):
    return jax.tree.map(
        lambda v: v.get_raw_value().spec, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


@pytest.mark.parametrize("mesh_name", EXPECTED)
def test_param_shardings_follow_rules(mesh_name):
    (shape, names), expected = EXPECTED[mesh_name]
    mesh = sharding.make_mesh(shape, names)
    state = nnx.state(FakeModel(), nnx.Param)
    specs = _specs(sharding.param_shardings(state, mesh))
    for key, spec in expected.items():
        assert specs[key] == spec, key
    fsdp = "fsdp" if "fsdp" in names else None
    assert specs["layers"][0]["norm"] == P(fsdp)


def test_metadata_survives_split_jit_grad_and_optimizer():
    model = FakeModel()
    _, state = nnx.split(model, nnx.Param)
    assert state["mlp_in"].get_metadata()["logical_axes"] == ("embed", "mlp")
    jitted = jax.jit(lambda s: s)(state)
    assert jitted["mlp_in"].get_metadata()["logical_axes"] == ("embed", "mlp")
    grads = nnx.grad(lambda m: jnp.sum(m.mlp_in[...] ** 2))(model)
    assert grads["mlp_in"].get_metadata()["logical_axes"] == ("embed", "mlp")
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    mesh = sharding.make_mesh((4, 2))
    opt_specs = _specs(sharding.param_shardings(nnx.state(opt), mesh))
    assert opt_specs["opt_state"][0]["mu"]["mlp_in"] == P("fsdp", None)
    assert opt_specs["opt_state"][0]["nu"]["word_emb"] == P(None, "fsdp")
    assert opt_specs["opt_state"][0]["count"] == P()


def test_device_put_and_jit_out_shardings():
    mesh = sharding.make_mesh((4, 2))
    state = nnx.state(FakeModel(), nnx.Param)
    shardings = sharding.param_shardings(state, mesh)
    placed = jax.device_put(state, shardings)
    assert placed["mlp_in"][...].sharding.spec == P("fsdp", None)
    # each fsdp shard holds half of the rows
    assert placed["mlp_in"][...].addressable_shards[0].data.shape == (8, 40)
    np.testing.assert_array_equal(placed["mlp_in"][...], state["mlp_in"][...])
    doubled = jax.jit(lambda s: jax.tree.map(lambda x: 2 * x, s), out_shardings=shardings)(state)
    assert doubled["word_emb"][...].sharding.spec == P(None, "fsdp")
    # abstract state (no allocation) works too
    abstract = nnx.state(nnx.eval_shape(FakeModel), nnx.Param)
    assert _specs(sharding.param_shardings(abstract, mesh))["mlp_in"] == P("fsdp", None)


def test_logical_to_spec_edge_cases():
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "model"))
    to_spec = sharding.logical_to_spec
    assert to_spec(None, (4, 4), mesh) == P(None, None)
    assert to_spec(("embed", "embed"), (4, 4), mesh) == P("fsdp", None)  # axis used once
    assert to_spec(("unknown", None), (4, 4), mesh) == P(None, None)
    assert to_spec(("heads",), (3,), mesh) == P(None)  # tensor-parallel axes never move
    assert to_spec(("embed", "pose_in"), (3, 8), mesh) == P(None, "fsdp")  # fsdp falls back
    assert to_spec(("batch", "embed"), (8, 4), mesh) == P(("data", "fsdp"), None)
    rules = (("embed", ("fsdp", "model")),)
    assert to_spec(("embed",), (8,), mesh, rules) == P(("fsdp", "model"))
    assert to_spec(("embed",), (6,), mesh, rules) == P("fsdp")  # keeps the part that fits
    with pytest.raises(ValueError, match="do not match"):
        to_spec(("embed",), (4, 4), mesh)


def test_make_mesh():
    mesh = sharding.make_mesh((-1, 2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    one = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    assert one.size == 1
    three = sharding.make_mesh((-1,), ("data",), devices=jax.devices()[:3])
    assert dict(three.shape) == {"data": 3}
    with pytest.raises(UserError, match="needs 16 devices"):
        sharding.make_mesh((8, 2))
    with pytest.raises(UserError, match="not divisible"):
        sharding.make_mesh((-1, 3))
    with pytest.raises(UserError, match="axes"):
        sharding.make_mesh((8,), ("data", "fsdp"))


def test_shard_batch_values_and_sharding():
    mesh = sharding.make_mesh((4, 2))
    batch = {
        "pose": np.arange(16 * 3 * 2, dtype=np.float32).reshape(16, 3, 2),
        "ids": np.arange(16, dtype=np.int32),
    }
    out = sharding.shard_batch(batch, mesh, ("data", "fsdp"))
    for key, value in batch.items():
        assert out[key].sharding == NamedSharding(mesh, P(("data", "fsdp")))
        np.testing.assert_array_equal(np.asarray(out[key]), value)
    # device (data=i, fsdp=j) holds rows 2*(2i+j) .. +2
    for shard in out["ids"].addressable_shards:
        i, j = np.argwhere(mesh.devices == shard.device)[0]
        np.testing.assert_array_equal(shard.data, [2 * (2 * i + j), 2 * (2 * i + j) + 1])
    # batch axes absent from the mesh are ignored
    data_only = sharding.shard_batch(batch, sharding.make_mesh((8,), ("data",)), ("data", "fsdp"))
    assert data_only["ids"].sharding.spec == P(("data",))
    with pytest.raises(UserError, match="'ids'"):
        sharding.shard_batch({"ids": np.arange(12)}, mesh, ("data", "fsdp"))
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.replicated(mesh).spec == P()
    assert sharding.num_batch_shards(mesh) == 8
