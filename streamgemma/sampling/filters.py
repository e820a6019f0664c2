"""Top-k, top-p and min-p: which tokens a row keeps, and the draw among them.

The kept set (today's definition, `sampler.sample_rows`): on the scaled
logits x of a row (after penalties and x / T),
- top_k keeps x >= the k-th largest value (every token tied with it too);
- top_p keeps the tokens, in the order of x descending (ties by smaller id
  first), whose probability mass before them is below top_p (the top token
  always stays), the probabilities being softmax of the top_k-kept logits;
- min_p keeps x >= max(x) + log(min_p) (float32 sum);
and the token is the Gumbel-max draw of `philox` over the kept ones.

The masses are exact integer arithmetic, not float32 sums: token v weighs
w[v] = round(exp(x[v] - max x) * 2**B) (float64 exp, B = 62 -
bit_length(V - 1): any sum of weights fits in int64), the mass before a
token is the sum of the weights before it, and a token is kept while
float64(mass before) < float64(top_p) * float64(sum of weights). So the kept
set depends only on the row's logits and settings, never on the batch, the
order of a sum or the device (up to a rare one-unit difference of a weight
where two libms round exp apart). The sort-based sampler this replaced
(`sampler_ref`) summed float32 softmax probabilities along a sorted row;
both agree except where that float32 sum lands within its rounding error of
top_p, and the token differs only if it is then the one drawn.

`sample_filtered` draws the tokens: on CUDA with the sort-free kernels of
`streamgemma.kernels.sampling_filters` (a radix search for the k-th value and
for the top_p boundary, then one fused pass for the noise and the argmax),
or where every row has a small top_k `streamgemma.kernels.filter_smallk`
(the top_k candidates gathered, then one program per row);
elsewhere with `keep_mask` below, the PyTorch form of the definition that
the kernels are tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .philox import gumbel_argmax_reference

# The small-top_k path (`kernels.filter_smallk`) serves batches of at most SMALL_K_ROWS whose rows all
# have 0 < top_k <= SMALL_K.
SMALL_K = 256
SMALL_K_ROWS = 16


def small_k_slots(top_k: list[int]) -> int:
    """Candidate slots per row for the small-top_k path, or 0 where it does not
    apply (some row's top_k off or above SMALL_K, or too many rows). The
    candidates of real logits are about k (the entries >= the k-th largest
    tile maximum): 8k slots, 512 to 2,048, leave room to spare, and a row
    that overflows is still exact (a slow whole-row pass)."""
    if not 0 < len(top_k) <= SMALL_K_ROWS or not all(0 < k <= SMALL_K for k in top_k):
        return 0
    return min(2048, max(512, 1 << (8 * max(top_k) - 1).bit_length()))


def mass_bits(vocab: int) -> int:
    """B such that `vocab` weights of at most 2**B sum below 2**62."""
    return 62 - max(1, (vocab - 1).bit_length())


def sortable_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) in the order of the float32 values x (-0.0 and
    0.0 one key): the radix search's digits, and the order top_p walks."""
    x = torch.where(x == 0, torch.zeros_like(x), x)
    bits = x.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2 ** 31


def mass_weights(x: torch.Tensor, row_max: torch.Tensor, bits: int) -> torch.Tensor:
    """w[s, v] = round(exp(x[s, v] - row_max[s]) * 2**bits), int64 (0 for -inf)."""
    e = torch.exp(x.double() - row_max.double()[:, None])
    w = (e * 2.0 ** bits + 0.5).to(torch.int64)
    return torch.where(x == float("-inf"), torch.zeros_like(w), w)


def keep_mask(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
    """The kept tokens, bool [S, V], of scaled logits x (float32 [S, V]) with
    per-row top_k (int64 [S], 0: off), top_p (float32 [S], 1: off) and
    log_min_p (float32 [S], -inf: off). Sorts: the reference of the kernels and
    the CPU path, not the fast path."""
    rows, vocab = x.shape
    keys = sortable_keys(x)
    sorted_keys, order = torch.sort(keys, dim=-1, descending=True, stable=True)
    k_on = (top_k > 0) & (top_k < vocab)
    kth = sorted_keys.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
    keep = ~k_on[:, None] | (keys >= kth)
    row_max = x.amax(dim=-1)
    weights = mass_weights(x, row_max, mass_bits(vocab)) * keep
    in_order = weights.gather(1, order)
    before = in_order.cumsum(dim=-1) - in_order
    total = weights.sum(dim=-1)
    limit = top_p.double() * total.double()
    kept = (before.double() < limit[:, None]) | ((top_p >= 1) | (total == 0))[:, None]
    keep &= torch.empty_like(kept).scatter_(1, order, kept)
    return keep & (x >= (row_max + log_min_p)[:, None])


def sample_filtered(x: torch.Tensor, words: torch.Tensor, temps: torch.Tensor | None, top_k: torch.Tensor,
                    top_p: torch.Tensor, log_min_p: torch.Tensor, has_top_k: bool, has_top_p: bool,
                    graphs: Callable | None = None, staged: bool = False, small_k: int = 0) -> torch.Tensor:
    """The sampled token of every row, int64 [S] on x's device: the Gumbel-max
    draw (`philox`) over the tokens `keep_mask` keeps of x / temps.

    x: float32 [S, V] (strided rows are fine); words: int64 [S, 4]
    (`philox.stream_words`); temps: float32 [S] or None; per-row filters as
    `keep_mask`. has_top_k / has_top_p: whether any row has one (the host
    knows; the kernels then skip the searches nobody needs). graphs: a
    `graphs.FilterGraphs` of the model, which replays the kernels from CUDA
    graphs (same tokens, a fraction of the launch cost); staged: x is a
    temporary of this call (see `FilterGraphs`); small_k: `small_k_slots` of
    the rows' top_k (when not 0 the kernels read only the top_k candidates:
    `kernels.filter_smallk`; same tokens)."""
    kernel = device_kernel(x.device.type)
    if kernel is not None and graphs is not None:
        return graphs(x, words, temps, top_k, top_p, log_min_p, has_top_k=has_top_k, has_top_p=has_top_p,
                      staged=staged, small_k=small_k)
    if kernel is not None:
        return kernel(x, words, temps, top_k, top_p, log_min_p, has_top_k=has_top_k, has_top_p=has_top_p,
                      small_k=small_k)
    if temps is not None:
        x = x / temps[:, None]
    keep = keep_mask(x, top_k, top_p, log_min_p)
    return gumbel_argmax_reference(x.masked_fill(~keep, float("-inf")), words)


@functools.cache
def device_kernel(device_type: str) -> Callable | None:
    """`filtered_draw` of the Triton kernels on CUDA, else None."""
    if device_type != "cuda":
        return None
    try:
        from streamgemma.kernels.filter_smallk import filtered_draw
    except ImportError:  # no Triton: the PyTorch form runs on the GPU too (same tokens, a sort)
        return None
    return filtered_draw
