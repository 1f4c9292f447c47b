"""Point-cloud models: serialization curves, grouping ops, PointMamba and Point Cloud Mamba."""
from .ops import farthest_point_sample, from_pyg, group_points, knn, packed_to_padded, padded_to_packed
from .pcm import PointCloudMamba  # importing pcm and pointmamba registers their entries
from .pointmamba import PointMamba, PointMambaMPM, PointMambaPartSeg
from .serialization import ORDERS, cts_encode, hilbert_decode, hilbert_encode, serialize, z_order_encode

__all__ = [
    "ORDERS", "serialize", "hilbert_encode", "hilbert_decode", "z_order_encode", "cts_encode",
    "farthest_point_sample", "knn", "group_points", "packed_to_padded", "padded_to_packed", "from_pyg",
    "PointMamba", "PointMambaMPM", "PointMambaPartSeg", "PointCloudMamba",
]
