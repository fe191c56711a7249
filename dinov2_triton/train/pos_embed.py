"""Position-embedding resampling: exactly what the official DINOv2 model does
at run time, done once at build time.

The official model (facebookresearch/dinov2, `DinoVisionTransformer.
interpolate_pos_encoding`) stores a 37x37 grid (518 px) and resizes it on
every forward pass for any other input size. Two variants exist, chosen per
architecture in `dinov2/hub/backbones.py`:

* plain models (`dinov2_vits14` ...): bicubic, no antialiasing, and the
  *scale factor* `(n + 0.1) / 37` instead of the output size (a historical
  offset "to avoid floating point error", kept for backward compatibility;
  the offset moves the sampling positions, so it changes the values);
* register models (`dinov2_vits14_reg` ...): `interpolate_antialias=True,
  interpolate_offset=0.0`, i.e. antialiased bicubic to `size=(n, n)`.

timm's build-time `resample_abs_pos_embed` (antialiased bicubic to size) is
the second one; for the plain models it differs from the official output by
about 1% of the class token at 224 px. Because our input size is fixed, baking
the official result into the weights gives the official model's numbers with
no interpolation left in any exported graph.

The method used is recorded in every checkpoint (`pos_embed_resampling`).
"""
from __future__ import annotations

import math

#: plain models: official `interpolate_offset=0.1, interpolate_antialias=False`
OFFICIAL_PLAIN = "dinov2_bicubic_offset0.1"
#: register models: official `interpolate_offset=0.0, interpolate_antialias=True`
OFFICIAL_REGISTERS = "dinov2_bicubic_antialias"
#: what builds before this module did (timm's resample_abs_pos_embed for every
#: arch); recorded for checkpoints that predate the field
LEGACY_TIMM = "timm_bicubic_antialias"

#: the grid every official checkpoint stores: 37x37 patches of 14 px
OFFICIAL_GRID_PX = 518

# name -> (scale-factor offset or None for size=, antialias)
_METHODS: dict[str, tuple[float | None, bool]] = {
    OFFICIAL_PLAIN: (0.1, False),
    OFFICIAL_REGISTERS: (None, True),
    LEGACY_TIMM: (None, True),
}
METHODS = tuple(_METHODS)


def official_method(num_register_tokens: int) -> str:
    """The resampling the official model applies for this architecture."""
    return OFFICIAL_REGISTERS if num_register_tokens else OFFICIAL_PLAIN


def resample_grid(grid, new_hw: tuple[int, int], method: str):
    """Resize a patch position grid [1, M*M, D] (no class position) to
    new_hw = (rows, cols) patches with `method`; returns [1, rows*cols, D]
    in the input's dtype (the arithmetic is float32, as in the official code).

    Same grid size: returned unchanged, as the official model skips the
    interpolation when the patch count matches and the input is square."""
    import torch.nn.functional as F

    if method not in _METHODS:
        raise ValueError(f"position-embedding resampling {method!r}: choose one of {METHODS}")
    if grid.ndim != 3 or grid.shape[0] != 1:
        raise ValueError(f"position embedding of shape {tuple(grid.shape)}: expected [1, tokens, dim]")
    n_tokens, dim = grid.shape[1], grid.shape[2]
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"position embedding has {n_tokens} patch positions: not a square grid")
    rows, cols = int(new_hw[0]), int(new_hw[1])
    if (rows, cols) == (side, side):
        return grid
    offset, antialias = _METHODS[method]
    x = grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset is None:
        out = F.interpolate(x, size=(rows, cols), mode="bicubic", antialias=antialias)
    else:
        # The official code passes the scale factor, not the size: the input
        # coordinate of output pixel i is (i + 0.5) * side / (n + offset) - 0.5.
        out = F.interpolate(x, scale_factor=((rows + offset) / side, (cols + offset) / side),
                            mode="bicubic", antialias=antialias)
    if tuple(out.shape[-2:]) != (rows, cols):
        raise ValueError(f"resampling {side}x{side} -> {rows}x{cols} with {method} gave "
                         f"{tuple(out.shape[-2:])}")
    return out.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(grid.dtype)
