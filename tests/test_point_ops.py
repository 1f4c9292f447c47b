"""Serialization curves and grouping ops for point clouds."""
import pytest
import torch

from zoo.models.point.ops import (
    farthest_point_sample, from_pyg, group_points, knn, packed_to_padded, padded_to_packed,
)
from zoo.models.point.serialization import (
    CTS_ORDERS, ORDERS, cts_encode, gather_points, hilbert_decode, hilbert_encode, invert_permutation,
    serialization_codes, serialize, z_order_encode,
)


def _full_grid(side):
    r = torch.arange(side)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


# ---------------------------------------------------------------- curves on known grids

def test_hilbert_2x2x2_known_order():
    # Skilling's curve for one bit: index bits (x, x^y, x^y^z), x most significant.
    expected = [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 0, 0]]
    assert hilbert_decode(torch.arange(8), 1).tolist() == expected
    assert hilbert_encode(torch.tensor(expected), 1).tolist() == list(range(8))


def test_z_order_2x2x2_known_codes():
    grid = _full_grid(2)  # x slowest in meshgrid order, so codes come out 0..7
    assert z_order_encode(grid).tolist() == list(range(8))
    assert z_order_encode(torch.tensor([[3, 0, 0], [0, 3, 0], [0, 0, 3]])).tolist() == [36, 18, 9]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_hilbert_is_a_bijection_with_unit_steps(depth):
    side = 1 << depth
    cells = hilbert_decode(torch.arange(side**3), depth)
    assert torch.equal(hilbert_encode(cells, depth), torch.arange(side**3))
    assert len({tuple(c) for c in cells.tolist()}) == side**3
    assert (cells[1:] - cells[:-1]).abs().sum(-1).eq(1).all()  # every step moves to a face neighbour


def test_hilbert_roundtrip_random_deep():
    g = torch.randint(0, 1 << 16, (500, 3))
    assert torch.equal(hilbert_decode(hilbert_encode(g, 16), 16), g)


def test_hilbert_per_cloud_depth_equals_separate_calls():
    g = torch.randint(0, 8, (12, 3))
    g[:6] //= 4  # first half needs depth 1, second half depth 3
    depth = torch.tensor([1] * 6 + [3] * 6)
    joint = hilbert_encode(g, depth)
    assert torch.equal(joint[:6], hilbert_encode(g[:6], 1))
    assert torch.equal(joint[6:], hilbert_encode(g[6:], 3))


@pytest.mark.parametrize("axes", CTS_ORDERS)
def test_cts_snake_is_dense_with_unit_steps(axes):
    grid = _full_grid(4)
    grid = grid[(grid[:, 1] < 3) & (grid[:, 2] < 2)]  # a 4 x 3 x 2 box: uneven sides
    code = cts_encode(grid, axes)
    assert sorted(code.tolist()) == list(range(len(grid)))
    walk = grid[code.argsort()]
    assert (walk[1:] - walk[:-1]).abs().sum(-1).eq(1).all()
    fast = "xyz".index(axes[0])
    assert walk[1, fast] - walk[0, fast] == 1  # the first named axis moves first


# ---------------------------------------------------------------- serialize on clouds

@pytest.mark.parametrize("order", ORDERS)
def test_serialize_permutation_inverse_and_locality(order):
    torch.manual_seed(0)
    xyz = torch.rand(2, 600, 3)
    perm, inv = serialize(xyz, order, grid_size=0.05)
    assert torch.equal(perm.sort(1).values, torch.arange(600).expand(2, -1))
    feats = torch.randn(2, 600, 5)
    assert torch.equal(gather_points(gather_points(feats, perm), inv), feats)
    # Curve neighbours are near in space (< 0.15 apart) far more often than random neighbours (~1%).
    walk = gather_points(xyz, perm)
    near = ((walk[:, 1:] - walk[:, :-1]).norm(dim=-1) < 0.15).float().mean()
    rand = xyz[:, torch.randperm(600)]
    rand_near = ((rand[:, 1:] - rand[:, :-1]).norm(dim=-1) < 0.15).float().mean()
    assert near > 0.25 and near > 10 * max(float(rand_near), 0.01)


def test_serialize_matches_per_cloud_and_pads_last():
    torch.manual_seed(1)
    xyz = torch.rand(3, 50, 3)
    lengths = torch.tensor([50, 20, 1])
    perm, _ = serialize(xyz, "hilbert", 0.1, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        alone, _ = serialize(xyz[i : i + 1, :n], "hilbert", 0.1)
        assert torch.equal(perm[i, :n], alone[0])
        assert sorted(perm[i, n:].tolist()) == list(range(n, 50))


def test_trans_orders_swap_x_and_y():
    xyz = torch.rand(1, 200, 3)
    a = serialization_codes(xyz, "hilbert-trans", 0.1)
    b = serialization_codes(xyz[..., [1, 0, 2]], "hilbert", 0.1)
    assert torch.equal(a, b)


def test_official_cts_variant_sorts_by_the_first_axis_with_the_parity_sign():
    # Largest cells: x 2, y 2 (even), z 1 (odd): exactly one odd -> descending first axis.
    xyz = torch.tensor([[[0.0, 0, 0], [2, 0, 1], [1, 2, 0]]]) + 0.5
    assert serialize(xyz, "xyz", grid_size=1.0, cts_variant="official")[0].tolist() == [[1, 2, 0]]
    assert serialize(xyz, "yxz", grid_size=1.0, cts_variant="official")[0].tolist() == [[2, 0, 1]]  # ties stay in input order
    even = torch.tensor([[[0.0, 0, 0], [2, 0, 0], [1, 2, 0]]]) + 0.5  # z max 0: both even -> ascending
    assert serialize(even, "xyz", grid_size=1.0, cts_variant="official")[0].tolist() == [[0, 2, 1]]
    with pytest.raises(ValueError, match="cts_variant must be 'snake' or 'official', got 'zigzag'"):
        serialize(xyz, "xyz", cts_variant="zigzag")


def test_serialize_errors():
    with pytest.raises(ValueError, match="unknown order 'peano'"):
        serialize(torch.rand(1, 5, 3), "peano")
    with pytest.raises(ValueError, match=r"expected points of shape \(batch, num_points, 3\), got \(5, 3\)"):
        serialize(torch.rand(5, 3))
    bad = torch.rand(1, 5, 3)
    bad[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="expected finite coordinates.*cloud 0, point 2"):
        serialize(bad)
    with pytest.raises(ValueError, match="use a larger grid_size"):
        serialize(torch.rand(1, 5, 3) * 1e6, grid_size=1e-3)
    assert invert_permutation(torch.tensor([[2, 0, 1]])).tolist() == [[1, 2, 0]]


# ---------------------------------------------------------------- FPS and kNN

def _fps_reference(x, m):
    idx, d = [0], ((x - x[0]) ** 2).sum(-1)
    for _ in range(m - 1):
        j = int(d.argmax())
        idx.append(j)
        d = torch.minimum(d, ((x - x[j]) ** 2).sum(-1))
    return idx


def test_fps_matches_reference_with_lengths():
    torch.manual_seed(2)
    xyz = torch.rand(3, 100, 3)
    lengths = torch.tensor([100, 37, 16])
    xyz[1, 37:] = 1e3  # padding far away must never be picked
    idx = farthest_point_sample(xyz, 16, lengths)
    for i, n in enumerate(lengths.tolist()):
        assert idx[i].tolist() == _fps_reference(xyz[i, :n], 16)
    assert sorted(idx[2].tolist()) == list(range(16))  # asks for every point of the smallest cloud


def test_knn_matches_brute_force_chunked():
    torch.manual_seed(3)
    pts, q = torch.rand(2, 300, 3), torch.rand(2, 40, 3)
    lengths = torch.tensor([300, 120])
    dist, idx = knn(q, pts, 8, points_lengths=lengths, max_elements=1000)  # many small chunks
    for b, n in enumerate(lengths.tolist()):
        full = torch.cdist(q[b], pts[b, :n]) ** 2
        ref_d, _ = full.topk(8, largest=False)
        torch.testing.assert_close(dist[b], ref_d, rtol=1e-5, atol=1e-6)
        assert (idx[b] < n).all()
        torch.testing.assert_close(full.gather(1, idx[b]), ref_d, rtol=1e-5, atol=1e-6)


def test_group_points_shapes_and_errors():
    xyz = torch.rand(2, 128, 3)
    neigh, centers, idx = group_points(xyz, 16, 8)
    assert neigh.shape == (2, 16, 8, 3) and centers.shape == (2, 16, 3)
    assert torch.allclose(neigh[:, :, 0], torch.zeros(()))  # each centre is its own nearest point
    with pytest.raises(ValueError, match="expected at least 64 point\\(s\\) per cloud, got 10 in cloud 1"):
        group_points(torch.rand(2, 128, 3), 64, 8, lengths=torch.tensor([128, 10]))
    with pytest.raises(ValueError, match="expected at least 1 point"):
        farthest_point_sample(torch.rand(1, 0, 3), 1)


def test_packed_padded_roundtrip_and_pyg_like():
    pos = torch.rand(10, 3)
    ptr = torch.tensor([0, 4, 4, 10])
    padded, lengths = packed_to_padded(pos, ptr=ptr)
    assert padded.shape == (3, 6, 3) and lengths.tolist() == [4, 0, 6]
    packed, ptr2 = padded_to_packed(padded, lengths)
    assert torch.equal(packed, pos) and torch.equal(ptr2, ptr)
    batch = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2, 2])
    assert torch.equal(packed_to_padded(pos, batch=batch)[0], padded)

    class Data:  # duck-typed torch_geometric Batch
        def __init__(self):
            self.pos, self.ptr, self.batch = pos, ptr, batch

    assert torch.equal(from_pyg(Data())[0], padded)
    with pytest.raises(ValueError, match="ptr must run from 0 to the number of points 10"):
        packed_to_padded(pos, ptr=torch.tensor([0, 4, 9]))


def test_real_torch_geometric_batch_feeds_pointmamba_lengths():
    pyg = pytest.importorskip("torch_geometric.data")
    from zoo.models.point.pointmamba import PointMamba

    clouds = [torch.rand(n, 3) for n in (40, 25)]
    batch = pyg.Batch.from_data_list([pyg.Data(pos=c) for c in clouds])
    padded, lengths = from_pyg(batch)
    assert lengths.tolist() == [40, 25] and torch.equal(padded[1, :25], clouds[1])
    assert torch.equal(from_pyg(pyg.Data(pos=clouds[0]))[0][0], clouds[0])
    model = PointMamba(num_classes=3, trans_dim=16, depth=1, num_group=8, group_size=8, head_hidden=8).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, lengths)[1], model(clouds[1][None])[0], rtol=1e-4, atol=1e-5)
