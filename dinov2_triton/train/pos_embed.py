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

DINOv3 (facebookresearch/dinov3) has no learned grid to resample: it applies
rotary position encoding (RoPE) to the patch tokens' queries and keys in
every block, with sin/cos tables that depend only on the patch grid. The
reference code rebuilds them on every forward pass from the input's height
and width; exported to ONNX that becomes shape-dependent `Range`/`If`
subgraphs which TensorRT's parser rejects (facebookresearch/dinov3#312).
Here the tables are computed once for the checkpoint's fixed image size
(`bake_rope`) and held as a buffer, so every exported graph carries them as
constants (recorded as `pos_embed_resampling: "dinov3_rope_fixed_grid"`).
The RoPE periods are a persistent tensor of the model: the official
checkpoints store them (`rope_embed.periods`, rounded to bfloat16 when they
were trained) and the official model uses the stored values, while
transformers and timm recompute them in float32; the weights' own periods are
kept (train/weight_layouts.py), so each layout reproduces its reference.
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

#: DINOv3: no learned grid, nothing resampled; RoPE tables computed for the fixed grid
ROPE_FIXED_GRID = "dinov3_rope_fixed_grid"

# name -> (scale-factor offset or None for size=, antialias)
_METHODS: dict[str, tuple[float | None, bool]] = {
    OFFICIAL_PLAIN: (0.1, False),
    OFFICIAL_REGISTERS: (None, True),
    LEGACY_TIMM: (None, True),
}
#: every value the checkpoint record's `pos_embed_resampling` may hold
METHODS = (*_METHODS, ROPE_FIXED_GRID)
#: the official DINOv3 RoPE base (every released model: `pos_embed_rope_base=100`)
ROPE_BASE = 100.0
#: a stored period may differ from the float32 one by bfloat16 rounding (8-bit mantissa)
ROPE_PERIOD_RTOL = 2.0 ** -8


def official_method(num_register_tokens: int, family: str = "dinov2") -> str:
    """The resampling the official model applies for this architecture
    (DINOv3: none, its RoPE tables are computed for the grid)."""
    if family == "dinov3":
        return ROPE_FIXED_GRID
    return OFFICIAL_REGISTERS if num_register_tokens else OFFICIAL_PLAIN


def resample_grid(grid, new_hw: tuple[int, int], method: str):
    """Resize a patch position grid [1, M*M, D] (no class position) to
    new_hw = (rows, cols) patches with `method`; returns [1, rows*cols, D]
    in the input's dtype (the arithmetic is float32, as in the official code).

    Same grid size: returned unchanged, as the official model skips the
    interpolation when the patch count matches and the input is square."""
    import torch.nn.functional as F

    if method not in _METHODS:
        raise ValueError(f"position-embedding resampling {method!r}: choose one of {tuple(_METHODS)}")
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


# ----------------------------------------------------------------------------- DINOv3 RoPE
def rope_periods(head_dim: int, base: float = ROPE_BASE):
    """The official periods in float32: base ** (2 i / (head_dim / 2)), i < head_dim / 4
    (dinov3 `RopePositionEmbedding._init_weights`; transformers' inverse frequencies)."""
    import torch

    if head_dim % 4:
        raise ValueError(f"RoPE head dimension {head_dim}: must be a multiple of 4")
    n = head_dim // 4
    return base ** (2.0 * torch.arange(n, dtype=torch.float32) / (head_dim // 2))


def check_rope_periods(periods, head_dim: int, source: str, base: float = ROPE_BASE) -> None:
    """Stored periods must be this architecture's (same count, equal to the
    float32 ones up to bfloat16 rounding); raises ValueError naming `source`."""
    import torch

    want = rope_periods(head_dim, base)
    if tuple(periods.shape) != tuple(want.shape):
        raise ValueError(f"{source}: {tuple(periods.shape)} RoPE periods, the architecture has {tuple(want.shape)} "
                         f"(head dimension {head_dim})")
    rel = ((periods.float() - want).abs() / want).max().item()
    if not rel <= ROPE_PERIOD_RTOL or not torch.isfinite(periods).all():
        raise ValueError(f"{source}: RoPE periods differ from base {base:g} by up to {rel:.3g} relative "
                         f"(> {ROPE_PERIOD_RTOL:.3g}, bfloat16 rounding): not a DINOv3 RoPE of this architecture")


def rope_tables(periods, grid_hw: tuple[int, int]):
    """sin and cos [rows*cols, head_dim] of the official DINOv3 RoPE for a
    fixed grid, in float32: patch centres (i + 0.5) / n mapped to [-1, 1] per
    axis ("separate" normalisation), angle 2 pi c / period, rows' frequencies
    then columns', the whole repeated twice (the rotate-half layout)."""
    import math

    import torch

    rows, cols = int(grid_hw[0]), int(grid_hw[1])
    p = periods.detach().float().cpu()
    ys = torch.arange(0.5, rows, dtype=torch.float32) / rows
    xs = torch.arange(0.5, cols, dtype=torch.float32) / cols
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)   # [HW, 2]
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[:, :, None] / p[None, None, :]).flatten(1)           # [HW, D/2]
    angles = torch.cat([angles, angles], dim=-1)                                         # [HW, D]
    return torch.sin(angles), torch.cos(angles)


def bake_rope(rope) -> None:
    """Recompute a timm DINOv3 RoPE module's cached table (what every
    forward pass uses at the fixed size) from its `periods`, with
    `rope_tables`; called at build time and after every state-dict load."""
    import torch

    if getattr(rope, "feat_shape", None) is None or getattr(rope, "pos_embed_cached", None) is None:
        raise ValueError("RoPE module without a fixed grid: build the backbone with dynamic_img_size=False")
    sin, cos = rope_tables(rope.periods, tuple(rope.feat_shape))
    cached = rope.pos_embed_cached
    with torch.no_grad():
        cached.copy_(torch.cat([sin, cos], dim=-1).to(device=cached.device, dtype=cached.dtype))


def keep_rope_periods(backbone) -> None:
    """Make the RoPE periods part of the backbone's state dict (timm keeps
    them as a non-persistent buffer) and rebake the table whenever a state
    dict is loaded, so a checkpoint carries the periods its numbers were made
    with. No-op for backbones without RoPE."""
    rope = getattr(backbone, "rope", None)
    if rope is None or not hasattr(rope, "periods"):
        return
    rope.register_buffer("periods", rope.periods, persistent=True)
    rope.register_load_state_dict_post_hook(lambda module, _incompatible: bake_rope(module))
    bake_rope(rope)
