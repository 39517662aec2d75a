"""The sampler's random numbers: Philox4x32-10 keyed by the request seed and counted by the decode step.

One call of the block function gives the uniform number of one draw, so a draw depends only on
(seed, step), never on what else was drawn before it, on the batch or on the device. All arithmetic is
on Python integers masked to 32 bits, which is exactly the uint32 arithmetic of the reference
(Random123, Salmon et al., SC'11); docs/sampling.md gives the layout and a worked test vector.
"""

from __future__ import annotations

import secrets

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # multiplier of counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplier of counter word 2
PHILOX_W0 = 0x9E3779B9  # key schedule increment of key word 0 (golden ratio)
PHILOX_W1 = 0xBB67AE85  # key schedule increment of key word 1 (sqrt(3) - 1)
PHILOX_ROUNDS = 10

SEED_MIN = 1
SEED_MAX = 9_999_999_999  # the request schema's range; any seed < 2**64 works below
UINT64_LIMIT = 1 << 64

Words4 = tuple[int, int, int, int]


def _mulhilo32(a: int, b: int) -> tuple[int, int]:
    product = a * b  # exact: the product of two uint32 fits in 64 bits
    return product >> 32, product & MASK32


def philox4x32(counter: Words4, key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> Words4:
    """The Philox4x32 block function: four 32-bit counter words and two key words to four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for i in range(rounds):
        if i > 0:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _check_uint64(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < UINT64_LIMIT:
        raise ValueError(f"{name}: {value!r} is out of range; allowed: integer 0..2**64-1")


def draw_words(seed: int, step: int) -> Words4:
    """Philox4x32-10 with key = (seed low 32 bits, seed high 32 bits), counter = (step low, step high, 0, 0)."""
    _check_uint64("seed", seed)
    _check_uint64("step", step)
    key = (seed & MASK32, seed >> 32)
    counter = (step & MASK32, step >> 32, 0, 0)
    return philox4x32(counter, key)


def words_to_uniform(w0: int, w1: int) -> float:
    """The top 53 bits of the 64-bit word (w1 << 32) | w0, scaled by 2**-53: a float64 in [0, 1)."""
    x = (w1 << 32) | w0
    return (x >> 11) * 2.0**-53  # exact: a 53-bit integer times a power of two


def uniform(seed: int, step: int) -> float:
    """The uniform number of draw `step` (0 = first generated token) of the request with this seed."""
    w0, w1, _, _ = draw_words(seed, step)
    return words_to_uniform(w0, w1)


def fresh_seed() -> int:
    """A seed from the OS entropy source, uniform over the schema's range [1, 9999999999]."""
    return SEED_MIN + secrets.randbelow(SEED_MAX - SEED_MIN + 1)


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i (0, 1, ...) of a request with `seed` sampled n times: seed, seed + 1, ...,
    wrapping from SEED_MAX back to SEED_MIN, so every sample's seed is in the schema's range."""
    return (seed - SEED_MIN + i) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
