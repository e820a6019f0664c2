"""Repetition and presence penalties in one launch: a penalized copy of each
row's logits.

The definition is `streamgemma.sampling.sampler._penalize` (PyTorch: a
gather, the penalty, a copy of the rows and a scatter, about ten launches):
each id of the row's recent ids, once however often it appears, gets
x / repetition if x > 0 else x * repetition, then minus presence. Here, grid
(rows, tiles): a program copies its tile, then writes the penalized value of
the ids that fall in its tile (read from the input, so repeats write the
same value). Bit-identical to the definition: the division rounds correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ids read per loop round; fixed, so a growing recent-id window (up to 1,024)
# never compiles a new kernel variant in the middle of a generation
WIDTH_BLOCK = 128


@triton.jit(do_not_specialize=["width"])
def _penalize_kernel(x_ptr, x_stride, out_ptr, ids_ptr, factors_ptr, vocab, width,
                     BLOCK: tl.constexpr, WIDTH_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    x_row = x_ptr + row.to(tl.int64) * x_stride
    out_row = out_ptr + row.to(tl.int64) * vocab
    tl.store(out_row + cols, tl.load(x_row + cols, mask=cols < vocab), mask=cols < vocab)
    tl.debug_barrier()  # the tile's copy lands before this program's penalized values overwrite it
    repetition = tl.load(factors_ptr + 2 * row)
    presence = tl.load(factors_ptr + 2 * row + 1)
    for w in range(0, width, WIDTH_BLOCK):
        k = w + tl.arange(0, WIDTH_BLOCK)
        ids = tl.load(ids_ptr + row.to(tl.int64) * width + k, mask=k < width, other=vocab)
        mine = (ids >= start) & (ids < start + BLOCK) & (ids < vocab)
        before = tl.load(x_row + ids, mask=mine, other=0.0)
        after = tl.where(before > 0, tl.math.div_rn(before, repetition), before * repetition) - presence
        tl.store(out_row + ids, after, mask=mine)


def penalize(x: torch.Tensor, ids: torch.Tensor, factors: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """x: float32 [P, V] (any row stride, column stride 1); ids: int64 [P, W]
    (ids >= V are ignored); factors: float32 [P, 2] (repetition, presence).
    A new contiguous [P, V] tensor; one launch, no host synchronisation."""
    rows, vocab = x.shape
    out = torch.empty(rows, vocab, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    if x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(f"penalize needs float32 rows with column stride 1, got {x.dtype} strides {x.stride()}")
    ids, factors = ids.contiguous(), factors.contiguous()
    width = ids.shape[1]
    _penalize_kernel[(rows, triton.cdiv(vocab, block))](
        x, x.stride(0), out, ids, factors, vocab, width, BLOCK=block,
        WIDTH_BLOCK=WIDTH_BLOCK,
        enable_fp_fusion=False)  # x * repetition - presence rounds twice, as in the definition
    return out
