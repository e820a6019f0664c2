"""Range checks shared by the Python API and the server's protocol edge, so
both refuse the same values with the same message: seeds the snapshot format
can hold, floats that stay meaningful once the sampler casts them to
float32, positions below the format's bound, token ids that fit an int32.

Type errors raise TypeError; values of the right type outside their range
raise `InvalidValueError`, whose `field` names the argument (the server
answers `invalid` with that field). No torch here: the client imports it.
"""

from __future__ import annotations

import math
import numbers
import struct

from .errors import InvalidValueError

# msgpack packs integers in [-2**63, 2**64), and a session's seed is stored as
# one in its snapshot; the sampler reduces it mod 2**64.
SEED_MIN, SEED_END = -(1 << 63), 1 << 64
# The snapshot format's bound on a session's position (docs/snapshot-format.md).
MAX_POSITION = 1 << 62
MAX_TOKEN_ID = (1 << 31) - 1  # ids travel in int32/int64 tensors
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 2.0 ** -126  # the smallest normal float32
# temperature and repetition_penalty divide float32 logits: below this the
# quotient can overflow to infinity, and the sampler would pick ties, not the top.
MIN_DIVISOR = 1e-6
# presence_penalty is subtracted before the temperature divides: beyond this a
# penalized logit over MIN_DIVISOR could overflow (infinite logits, NaN logprobs).
MAX_PRESENCE = 1e6
# Stop strings a server request may carry: each is matched on every token, in the tick all sessions share.
MAX_STOP_STRINGS = 16


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def short(value: object, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: messages never echo untrusted input at length."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def type_error(field: str, message: str) -> TypeError:
    """A TypeError whose `field` names the argument, as InvalidValueError's does."""
    error = TypeError(message)
    error.field = field
    return error


def check_int(field: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi] (either bound optional)."""
    if not is_int(value):
        raise type_error(field, f"{field} must be an integer, got {short(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise InvalidValueError(field, f"{field} must be in {span}, got {short(value)}")
    return value


def check_seed(seed: object, field: str = "seed") -> int | None:
    """None, or an int that a snapshot can hold: in [-2**63, 2**64)."""
    if seed is None:
        return None
    if not is_int(seed):
        raise type_error(field, f"{field} must be an integer or None, got {short(seed)}")
    if not SEED_MIN <= int(seed) < SEED_END:
        raise InvalidValueError(field, f"{field} must be in [-2**63, 2**64) (what a snapshot stores), "
                                       f"got {short(seed)}")
    return int(seed)


def check_float32(field: str, value: object, lo: float, hi: float, zero_ok: bool = False) -> float:
    """A finite number in [lo, hi] (or exactly 0 if zero_ok) that float32
    represents without becoming 0 or infinite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_error(field, f"{field} must be a number, got {short(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        value = math.inf
    if zero_ok and value == 0:
        return 0.0
    if not (math.isfinite(value) and lo <= value <= hi) or _as_float32(value) == 0:
        zero = "0 or " if zero_ok else ""
        raise InvalidValueError(field, f"{field} must be {zero}in [{lo:g}, {hi:g}] (a value float32 holds), "
                                       f"got {short(value)}")
    return value


def _as_float32(value: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.inf


def check_sampling(params) -> None:
    """The numeric fields of a `SamplingParams` (checked for type already):
    ranges that the float32 sampler honours, ids and seeds that fit."""
    check_float32("temperature", params.temperature, MIN_DIVISOR, FLOAT32_MAX, zero_ok=True)
    check_float32("top_p", params.top_p, FLOAT32_TINY, 1.0)
    check_float32("min_p", params.min_p, FLOAT32_TINY, math.nextafter(1.0, 0.0), zero_ok=True)
    check_float32("repetition_penalty", params.repetition_penalty, MIN_DIVISOR, FLOAT32_MAX)
    check_float32("presence_penalty", params.presence_penalty, -MAX_PRESENCE, MAX_PRESENCE, zero_ok=True)
    check_int("top_k", params.top_k, 0, MAX_TOKEN_ID)
    if params.max_tokens is not None:
        check_int("max_tokens", params.max_tokens, 1, None)
    for i in params.stop_token_ids or ():
        check_int("stop_token_ids", i, 0, MAX_TOKEN_ID)
    check_seed(params.seed)


def check_position(position: int, field: str) -> None:
    """A position a snapshot can record (below 2**62): input or a generation
    that would pass it is refused up front, as snapshots refuse it on read."""
    if position >= MAX_POSITION:
        raise InvalidValueError(field, f"this would take the session to position {position}, past the "
                                       f"snapshot format's bound of 2**62")
