import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.kernels import BlockSizes, _dispatch


@pytest.mark.parametrize(
    ("size", "rows", "block_rows", "padded"),
    [
        (768 * 3072, 18432, 512, False),  # ViT-B/32 MLP kernel: a free reshape
        (50 * 768, 512, 512, True),  # 300 rows: one block, height a power of two
        (1001 * 128 - 5, 1024, 64, True),  # 1001 rows: no divisor >= 64, padded
        (7, 64, 64, True),  # a tiny leaf: one block
        (512 * 128 * 3, 1536, 512, False),
    ],
)
def test_tiling(size, rows, block_rows, padded):
    tl = _dispatch.tiling(size, BlockSizes(rows=512, min_rows=64))
    assert (tl.rows, tl.block_rows, tl.padded) == (rows, block_rows, padded)
    assert tl.rows % tl.block_rows == 0 and tl.rows * tl.lanes >= size
    assert tl.block_rows & (tl.block_rows - 1) == 0  # a power of two (Triton)


def test_tiles_round_trip(rng):
    bs = BlockSizes(rows=64, min_rows=32)
    x = jnp.asarray(rng.normal(size=(3, 37, 11)), jnp.float32)
    tl = _dispatch.tiling(37 * 11, bs)
    tiles = _dispatch.to_tiles(x, tl, stacked=True)
    assert tiles.shape == (3, tl.rows, tl.lanes)
    np.testing.assert_array_equal(np.asarray(tiles).reshape(3, -1)[:, 37 * 11 :], 0.0)
    np.testing.assert_array_equal(_dispatch.from_tiles(tiles[1], tl, (37, 11)), x[1])


def test_resolve():
    native = jax.default_backend() in ("gpu", "tpu")
    assert _dispatch.resolve(None, where="f") == ("pallas" if native else "xla")
    assert _dispatch.resolve("pallas", where="f") == "pallas"
    with pytest.raises(ValueError, match=r"implementation='cuda' must be one of .* \(in f\)"):
        _dispatch.resolve("cuda", where="f")


def test_block_sizes_validation():
    assert BlockSizes.default("gpu").rows & (BlockSizes.default("gpu").rows - 1) == 0
    with pytest.raises(ValueError, match="BlockSizes.rows=48 must be a positive power of two"):
        BlockSizes(rows=48)
    with pytest.raises(ValueError, match="BlockSizes.lanes=100 must be a multiple of 128"):
        BlockSizes(lanes=100)
    with pytest.raises(ValueError, match="BlockSizes.min_rows=64 must be <= rows=32"):
        BlockSizes(rows=32, min_rows=64)
