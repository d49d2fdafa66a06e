"""GradCache accumulation equals the full-batch step, single-device and sharded."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from signclip_jax.errors import UserError
from signclip_jax.train import grad_cache, losses, sharding

B, D, HIDDEN, H = 32, 8, 24, 16


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (D, HIDDEN), "w2": (HIDDEN, H), "wt": (D, H)}
    return {
        k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32) for k, s in shapes.items()
    }


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    pose = rng.normal(size=(B, D)).astype(np.float32)
    return {"pose": pose, "text": (pose + 0.5 * rng.normal(size=(B, D))).astype(np.float32)}


def embed(params, mb):
    """Small two-tower MLP: pose [b, D] -> [b, H], text [b, D] -> [b, H]."""
    return jnp.tanh(mb["pose"] @ params["w1"]) @ params["w2"], mb["text"] @ params["wt"]


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def embed_model(params, mb):
    return embed(params["model"], mb)


def _reference(name, params, batch):
    fn = losses.make_loss_fn(name, None)
    full = jax.value_and_grad(lambda p: fn(*embed_model(p, batch), p["loss"]), has_aux=True)
    return jax.jit(full)(params)


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
def test_single_device_matches_full_batch(num_microbatches):
    params, batch = _params(), _batch()

    def loss_fn(pose, text, _):
        return losses.signclip_loss(pose, text)

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(*embed(p, batch), p)))(
        params
    )
    step = jax.jit(
        lambda p, b: grad_cache.accumulated_value_and_grad(embed, loss_fn, p, b, num_microbatches)
    )
    loss, grads = step(params, batch)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert _max_diff(grads, ref_grads) < 1e-5
    assert _max_diff(grads, jax.tree.map(jnp.zeros_like, grads)) > 1e-3


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
def test_sharded_matches_full_batch(num_microbatches):
    mesh = sharding.make_mesh((4, 2))
    params = {"model": _params(), "loss": {"logit_scale": jnp.float32(2.0)}}
    batch = _batch()
    (ref_loss, ref_metrics), ref_grads = _reference("clip", params, batch)
    sharded_loss = losses.make_loss_fn("clip", mesh, ("data", "fsdp"))
    step = jax.jit(
        lambda p, b: grad_cache.accumulated_value_and_grad(
            embed_model, lambda pe, te, p_: sharded_loss(pe, te, p_["loss"]), p, b, num_microbatches
        )
    )
    global_batch = sharding.shard_batch(batch, mesh, ("data", "fsdp"))
    (loss, metrics), grads = step(params, global_batch)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert _max_diff(grads, ref_grads) < 1e-5  # encoder and logit_scale gradients
    assert abs(float(grads["loss"]["logit_scale"])) > 1e-4
    assert _max_diff(metrics, ref_metrics) < 1e-5


def test_microbatch_split_moves_no_data_between_devices():
    # Microbatch m takes rows m, m+M, ...: every device keeps its own rows, so embedding all
    # microbatches and reassembling them compiles to a program without collectives.
    mesh = sharding.make_mesh((4, 2))
    global_batch = sharding.shard_batch(_batch(), mesh, ("data", "fsdp"))

    def embed_all(params, batch):
        take = lambda i: embed(params, grad_cache._take(batch, 4, i))
        return grad_cache._merge(jax.lax.map(take, jnp.arange(4)))

    compiled = jax.jit(embed_all).lower(_params(), global_batch).compile()
    text = compiled.as_text()
    for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
        assert not re.search(rf"\b{op}(-start)?\(", text), op
    pose, _ = compiled(_params(), global_batch)
    np.testing.assert_allclose(pose, embed(_params(), _batch())[0], atol=1e-6)


def test_take_merge_round_trip():
    x = jnp.arange(24).reshape(12, 2)
    np.testing.assert_array_equal(grad_cache._take(x, 3, jnp.int32(1)), x[1::3])
    micro = jnp.stack([grad_cache._take(x, 3, jnp.int32(i)) for i in range(3)])
    np.testing.assert_array_equal(grad_cache._merge(micro), x)


def test_rng_is_the_same_in_both_passes():
    # Dropout in the pose tower: the accumulated gradients must equal the gradients of the
    # full-batch loss whose microbatch m was embedded with fold_in(rng, m).
    params, batch = _params(), _batch()
    rng, m = jax.random.key(3), 4

    def embed_dropout(p, mb, key):
        pose, text = embed(p, mb)
        keep = jax.random.bernoulli(key, 0.7, pose.shape)
        return jnp.where(keep, pose / 0.7, 0.0), text

    def reference(p):
        outs = [
            embed_dropout(p, grad_cache._take(batch, m, i), jax.random.fold_in(rng, i))
            for i in range(m)
        ]
        pose = grad_cache._merge(jnp.stack([o[0] for o in outs]))
        text = grad_cache._merge(jnp.stack([o[1] for o in outs]))
        return losses.signclip_loss(pose, text)

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    loss, grads = jax.jit(
        lambda p: grad_cache.accumulated_value_and_grad(
            embed_dropout, lambda pe, te, _: losses.signclip_loss(pe, te), p, batch, m, rng=rng
        )
    )(params)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert _max_diff(grads, ref_grads) < 1e-5


def test_bad_microbatch_count():
    def loss_fn(pose, text, _):
        return losses.signclip_loss(pose, text)

    with pytest.raises(UserError, match="not divisible"):
        grad_cache.accumulated_value_and_grad(embed, loss_fn, _params(), _batch(), 5)
    ragged = {"pose": np.ones((4, D)), "text": np.ones((6, D))}
    with pytest.raises(UserError, match="leading"):
        grad_cache.accumulated_value_and_grad(embed, loss_fn, _params(), ragged, 2)


class TinyTowers(nnx.Module):
    def __init__(self, rngs):
        self.pose = nnx.Linear(D, H, rngs=rngs)
        self.text = nnx.Linear(D, H, rngs=rngs)

    def __call__(self, mb):
        return jnp.tanh(self.pose(mb["pose"])), self.text(mb["text"])


def test_nnx_state_params():
    # The trainer's pattern: split an NNX model, merge it inside embed_fn.
    graphdef, state = nnx.split(TinyTowers(nnx.Rngs(0)), nnx.Param)
    batch = _batch()

    def embed_nnx(p, mb):
        return nnx.merge(graphdef, p)(mb)

    def loss_fn(pose, text, _):
        return losses.signclip_loss(pose, text), {"rows": jnp.float32(pose.shape[0])}

    ref_loss, ref_grads = jax.jit(
        jax.value_and_grad(lambda p: loss_fn(*embed_nnx(p, batch), p)[0])
    )(state)
    (loss, aux), grads = jax.jit(
        lambda p: grad_cache.accumulated_value_and_grad(embed_nnx, loss_fn, p, batch, 2)
    )(state)
    assert float(aux["rows"]) == B
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert isinstance(grads, nnx.State)
    assert _max_diff(grads, ref_grads) < 1e-5
