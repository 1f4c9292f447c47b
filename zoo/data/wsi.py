"""Whole-slide images to MIL bags: read a slide with OpenSlide, find tissue with Otsu's threshold on
a low-resolution level, tile the tissue at a chosen magnification, embed the tiles with any
zoo / timm backbone in batches, and cache each slide's bag (features + tile coordinates) as a
safetensors file. An interrupted extraction resumes from the tiles already embedded.

Needs the ``wsi`` extra: ``openslide-python`` and ``openslide-bin`` (the OpenSlide library).
Magnification is converted to microns per pixel with the usual 10 / magnification (20x = 0.5
um/px); the slide's own resolution comes from ``openslide.mpp-x`` (or its objective power).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["open_slide", "otsu_threshold", "tissue_mask", "TileGrid", "tile_grid", "extract_slide_features",
           "extract_features", "load_bag"]


def open_slide(path: Union[str, Path]):
    try:
        import openslide
    except ImportError as e:
        raise ImportError("whole-slide reading needs OpenSlide: pip install 'mamba-zoo[wsi]' "
                          "(openslide-python and openslide-bin)") from e
    if not Path(path).is_file():
        raise FileNotFoundError(f"slide not found: {path}")
    return openslide.OpenSlide(str(path))


def slide_mpp(slide) -> float:
    """Microns per pixel at level 0, from the slide's mpp or else its objective power."""
    props = slide.properties
    if "openslide.mpp-x" in props:
        return float(props["openslide.mpp-x"])
    if "openslide.objective-power" in props:
        return 10.0 / float(props["openslide.objective-power"])
    raise ValueError("slide has neither openslide.mpp-x nor openslide.objective-power; pass base_mpp= explicitly")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of uint8-range values: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0, 256))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)  # weight of the class at or below each cut
    mu = np.cumsum(p * centers)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(slide, level: Optional[int] = None) -> Tuple[np.ndarray, float]:
    """Boolean tissue mask on a low-resolution level (default: the coarsest) and that level's
    downsample. Tissue is stained, background is near-grey: Otsu on HSV saturation."""
    level = slide.level_count - 1 if level is None else level
    w, h = slide.level_dimensions[level]
    rgb = _to_rgb(slide.read_region((0, 0), level, (w, h)))
    mx, mn = rgb.max(axis=2).astype(np.float32), rgb.min(axis=2).astype(np.float32)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1) * 255, 0)
    return sat > otsu_threshold(sat), float(slide.level_downsamples[level])


def _to_rgb(region) -> np.ndarray:
    """OpenSlide's RGBA (transparent outside the scanned area) -> RGB on white."""
    rgba = np.asarray(region, dtype=np.float32)
    alpha = rgba[..., 3:4] / 255.0
    return (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)


@dataclass
class TileGrid:
    """Tiles of ``tile_size`` px at ``mpp``: level-0 top-left corners, read from ``level`` with
    ``read_size`` px and resized to ``tile_size``."""
    coords: np.ndarray  # (n, 2) int64, level-0 (x, y)
    level: int
    read_size: int
    tile_size: int
    mpp: float


def tile_grid(slide, magnification: float = 20.0, tile_size: int = 224, min_tissue: float = 0.5,
              base_mpp: Optional[float] = None, mask_level: Optional[int] = None) -> TileGrid:
    """Non-overlapping tiles at ``magnification`` that are at least ``min_tissue`` tissue."""
    if magnification <= 0 or tile_size <= 0:
        raise ValueError(f"tile_grid: magnification and tile_size must be positive, got {magnification}, {tile_size}")
    target_mpp = 10.0 / magnification
    scale = target_mpp / (base_mpp or slide_mpp(slide))  # level-0 px per output px
    if scale < 1 - 1e-6:
        raise ValueError(f"tile_grid: {magnification}x ({target_mpp:.3f} um/px) is finer than the slide's level 0 "
                         f"({target_mpp / scale:.3f} um/px)")
    # Read from the coarsest level that is still at least as fine as the target.
    level = max(i for i, d in enumerate(slide.level_downsamples) if d <= scale + 1e-6)
    read_size = int(round(tile_size * scale / slide.level_downsamples[level]))
    step = tile_size * scale  # level-0 px
    W, H = slide.level_dimensions[0]
    xs = np.arange(0, W - step + 1e-6, step)
    ys = np.arange(0, H - step + 1e-6, step)
    mask, mask_down = tissue_mask(slide, mask_level)
    # Tissue fraction of each tile: mean of the mask over the tile's footprint on the mask level.
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0, x1 = _footprint(xs, step, mask_down, mask.shape[1])
    y0, y1 = _footprint(ys, step, mask_down, mask.shape[0])
    x0, x1, y0, y1 = x0[None, :], x1[None, :], y0[:, None], y1[:, None]
    frac = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / ((x1 - x0) * (y1 - y0))
    gy, gx = np.nonzero(frac >= min_tissue)  # row-major: tiles ordered top to bottom, left to right
    coords = np.stack([np.round(xs[gx]), np.round(ys[gy])], axis=1)
    return TileGrid(coords.astype(np.int64).reshape(-1, 2), level, read_size, tile_size, target_mpp)


def _footprint(starts: np.ndarray, step: float, down: float, limit: int):
    """[lo, hi) cells of a tile's span on a grid downsampled by ``down`` (at least one cell)."""
    lo = np.minimum((starts / down).astype(np.int64), limit - 1)
    hi = np.clip(np.ceil((starts + step) / down).astype(np.int64), lo + 1, limit)
    return lo, hi


def _read_tiles(slide, grid: TileGrid, indices: Sequence[int]) -> np.ndarray:
    from PIL import Image

    tiles = []
    for i in indices:
        region = slide.read_region(tuple(int(v) for v in grid.coords[i]), grid.level, (grid.read_size, grid.read_size))
        rgb = _to_rgb(region)
        if grid.read_size != grid.tile_size:
            rgb = np.asarray(Image.fromarray(rgb).resize((grid.tile_size, grid.tile_size), Image.BILINEAR))
        tiles.append(rgb)
    return np.stack(tiles)


def _resolve_backbone(backbone: Union[str, nn.Module], pretrained: bool, name: Optional[str] = None):
    """A module, or a timm / zoo entry name (zoo entries are reachable through timm), with the
    normalisation it expects."""
    if isinstance(backbone, str):
        import timm

        model = timm.create_model(backbone, pretrained=pretrained, num_classes=0)
        name = backbone
    else:
        model, name = backbone, name or type(backbone).__name__
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return model.eval(), name, mean, std


def _bag_path(out_dir: Path, slide_path: Path) -> Path:
    return out_dir / f"{slide_path.stem}.safetensors"


def _save(path: Path, features: torch.Tensor, coords: np.ndarray, meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({"features": features.contiguous(), "coords": torch.from_numpy(coords).contiguous()}, str(tmp),
              metadata={"zoo_wsi": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache


def load_bag(path: Union[str, Path]):
    """(features (n, d) float32, coords (n, 2) int64 level-0 xy, metadata dict) of a cached bag."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["zoo_wsi"])
        return f.get_tensor("features"), f.get_tensor("coords"), meta


@torch.no_grad()
def extract_slide_features(
    slide_path: Union[str, Path],
    backbone: Union[str, nn.Module],
    out_dir: Union[str, Path],
    magnification: float = 20.0,
    tile_size: int = 224,
    batch_size: int = 64,
    min_tissue: float = 0.5,
    device: Union[str, torch.device] = "cpu",
    pretrained: bool = True,
    base_mpp: Optional[float] = None,
    save_every: int = 10,
    progress: bool = True,
    backbone_name: Optional[str] = None,
) -> Path:
    """Embed every tissue tile of one slide; returns the bag's safetensors path.

    A finished bag is returned as is. Partial progress is saved every ``save_every`` batches to
    ``<stem>.partial.safetensors``; a rerun with the same settings continues from there.
    ``backbone_name`` names a module backbone in the bag's metadata (default: its class name).
    """
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = _bag_path(out_dir, slide_path)
    if final.exists():
        return final
    model, name, mean, std = _resolve_backbone(backbone, pretrained, backbone_name)
    model = model.to(device)
    slide = open_slide(slide_path)
    try:
        grid = tile_grid(slide, magnification, tile_size, min_tissue, base_mpp)
        if len(grid.coords) == 0:
            raise ValueError(f"{slide_path.name}: no tile at {magnification}x has >= {min_tissue:.0%} tissue; "
                             "lower min_tissue or check the slide")
        meta = dict(slide=slide_path.name, backbone=name, magnification=magnification, tile_size=tile_size,
                    mpp=grid.mpp, min_tissue=min_tissue, num_tiles=len(grid.coords))
        partial = out_dir / f"{slide_path.stem}.partial.safetensors"
        done: List[torch.Tensor] = []
        if partial.exists():
            feats, coords, old = load_bag(partial)
            if old != meta or not np.array_equal(coords.numpy(), grid.coords[: len(coords)]):
                raise ValueError(f"{partial} was made with other settings ({old}); expected {meta}. Delete it to restart.")
            done = [feats]
        start = sum(len(f) for f in done)
        mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        batches = range(start, len(grid.coords), batch_size)
        bar = tqdm(total=len(grid.coords), initial=start, desc=slide_path.stem, unit="tile", disable=not progress)
        for k, i in enumerate(batches, 1):
            idx = range(i, min(i + batch_size, len(grid.coords)))
            x = torch.from_numpy(_read_tiles(slide, grid, idx)).to(device).permute(0, 3, 1, 2).float() / 255.0
            f = model((x - mean_t) / std_t)
            done.append(f.reshape(len(idx), -1).float().cpu())
            bar.update(len(idx))
            if k % save_every == 0 and idx[-1] + 1 < len(grid.coords):
                _save(partial, torch.cat(done), grid.coords[: idx[-1] + 1], meta)
        bar.close()
        _save(final, torch.cat(done), grid.coords, meta)
        partial.unlink(missing_ok=True)
        return final
    finally:
        slide.close()


def extract_features(slide_paths: Sequence[Union[str, Path]], backbone: Union[str, nn.Module], out_dir, **kwargs) -> List[Path]:
    """``extract_slide_features`` over many slides with one backbone; finished slides are
    skipped on a rerun."""
    model, name, _, _ = _resolve_backbone(backbone, kwargs.pop("pretrained", True), kwargs.pop("backbone_name", None))
    return [extract_slide_features(p, model, out_dir, pretrained=False, backbone_name=name, **kwargs)
            for p in tqdm(list(slide_paths), desc="slides", unit="slide", disable=not kwargs.get("progress", True))]
