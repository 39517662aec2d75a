"""An independent numpy replay of flash_prefill's documented numbers (qwen_ref_kernels/flash_prefill.py), for
tests/test_flash_prefill.py: float32 arithmetic step by step, every fused multiply-add emulated exactly (the product
of two float32 numbers is exact in float64; the sum is taken exactly with TwoSum and rounded to odd in float64, so
the one conversion to float32 rounds correctly, with no double rounding). fma32 is itself checked against exact
Fractions by the tests.
"""

from __future__ import annotations

import numpy as np

F32, F64 = np.float32, np.float64


# ---------------------------------------------------------------- exact float32 fma, flushing, rounding to bfloat16
def fma32(a, b, c):
    """float32(a * b + c) rounded once (to nearest, ties to even), elementwise; a, b, c float32 arrays."""
    a, b, c = np.broadcast_arrays(np.asarray(a, F32), np.asarray(b, F32), np.asarray(c, F32))
    with np.errstate(all="ignore"):
        p = a.astype(F64) * b.astype(F64)  # exact: 24 + 24 bits, and far inside float64's exponent range
        c64 = c.astype(F64)
        s = p + c64
        bb = s - p
        err = (p - (s - bb)) + (c64 - bb)  # TwoSum: p + c == s + err exactly (finite values)
        fix = np.isfinite(s) & (err != 0) & ((s.view(np.int64) & 1) == 0)
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)  # round to odd
        return s.astype(F32)


def flush(x):
    """subnormal float32 -> zero of its sign"""
    x = np.asarray(x, F32)
    u = x.view(np.uint32)
    return np.where((u & 0x7F800000) == 0, u & 0x80000000, u).astype(np.uint32).view(F32)


def bf16_round(x):
    """float32 -> bfloat16 value (as float32), to nearest even; NaN -> 0x7FC00000"""
    u = np.asarray(x, F32).view(np.uint32).astype(np.uint64)
    r = ((u + ((u >> 16) & 1) + 0x7FFF) & 0xFFFF0000).astype(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, np.uint32(0x7FC00000), r).astype(np.uint32).view(F32)


def f16_round(x):
    """float32 -> float16 value (as float32), to nearest even (numpy's conversion rounds correctly)"""
    with np.errstate(all="ignore"):
        return np.asarray(x, F32).astype(np.float16).astype(F32)


def dot_pair(x_even, x_odd, w_even, w_odd, acc):
    """VDPBF16PS for one pair, as documented: odd product first, every input and result flushed"""
    acc = flush(fma32(flush(x_odd), flush(w_odd), flush(acc)))
    return flush(fma32(flush(x_even), flush(w_even), acc))


# ---------------------------------------------------------------- exp16, each float32 operation separately
C = {k: F32(v) for k, v in dict(log2e=1.44269504088896341, shift=12582912.0, c1=-0.693359375, c2=2.12194440e-4,
                                p0=1.9875691500e-4, p1=1.3981999507e-3, p2=8.3334519073e-3, p3=4.1665795894e-2,
                                p4=1.6666665459e-1, p5=5.0000001201e-1, one=1.0, lo=-87.0).items()}


def exp16(x):
    x = np.asarray(x, F32)
    with np.errstate(all="ignore"):
        fi = np.where(x < C["lo"], C["lo"], x).astype(F32)
        n = ((fi * C["log2e"]).astype(F32) + C["shift"]).astype(F32) - C["shift"]
        n = n.astype(F32)
        r = fma32(n, C["c1"], fi)
        r = fma32(n, C["c2"], r)
        y = np.full_like(x, C["p0"])
        for k in ("p1", "p2", "p3", "p4", "p5"):
            y = fma32(y, r, C[k])
        rr = (r * r).astype(F32)
        y = (fma32(y, rr, r) + C["one"]).astype(F32)
        ni = np.where(np.isfinite(n), n, 0).astype(np.int64)  # NaN input: the bits don't matter, e is NaN via y
        two_n = (((ni + 127) << 23) & 0xFFFFFFFF).astype(np.uint32).view(F32)
        e = (y * two_n).astype(F32)
    return np.where(x < C["lo"], F32(0), e).astype(F32)


def hsum64(p):
    """p [..., 64]: sum = p[0:16] + p[16:32] + p[32:48] + p[48:64] (from a zero vector), then folded in halves"""
    s = np.zeros((*p.shape[:-1], 16), F32)
    for c in range(4):
        s = (s + p[..., 16 * c:16 * c + 16]).astype(F32)
    for w in (8, 4, 2, 1):
        s = (s[..., :w] + s[..., w:2 * w]).astype(F32)
    return s[..., 0]


# ---------------------------------------------------------------- the documented attention, one (row, head)
def replay_head(q, k, v, scale, half=False):
    """q [T, D], k, v [S, D] float32 arrays holding bfloat16 (half: float16) values -> out [T, D] float32 holding
    bfloat16 (float16) values"""
    rnd = f16_round if half else bf16_round
    T, D = q.shape
    S = k.shape[0]
    KB = 64
    scale = F32(scale)
    pos = S - T + np.arange(T)  # query i's position
    nb_all = (S + KB - 1) // KB
    Spad = nb_all * KB
    kp = np.zeros((Spad, D), F32)
    kp[:S] = k
    vp = np.zeros((Spad, D), F32)
    vp[:S] = v
    # scores: [T, Spad], the head size in pairs ascending, odd element first
    acc = np.zeros((T, Spad), F32)
    if half:  # the head size in order, one fma each
        for d in range(D):
            acc = fma32(q[:, d, None], kp[None, :, d], acc)
    else:
        for p in range(D // 2):
            acc = dot_pair(q[:, 2 * p, None], q[:, 2 * p + 1, None], kp[None, :, 2 * p], kp[None, :, 2 * p + 1], acc)
    t_all = (acc * scale).astype(F32)
    # per-row block counts and per-(row, block) pair counts
    nblocks = pos // KB + 1  # each row takes the blocks that hold its keys
    last_key = pos
    m = np.full(T, -np.inf, F32)
    l = np.zeros(T, F32)
    o = np.zeros((T, D), F32)
    with np.errstate(all="ignore"):
        for b in range(int(nblocks.max())):
            live = b < nblocks  # rows that take this block
            keys = b * KB + np.arange(KB)
            t = t_all[:, b * KB:(b + 1) * KB]
            t = np.where(keys[None, :] <= pos[:, None], t, F32(-np.inf)).astype(F32)  # also masks keys >= S
            mb = t.max(axis=1)
            mn = np.maximum(m, mb)
            a = exp16((m - mn).astype(F32))
            p = rnd(exp16((t - mn[:, None]).astype(F32)))
            l_new = ((l * a).astype(F32) + hsum64(p)).astype(F32)
            on = (o * a[:, None]).astype(F32)
            nkeys = np.clip(last_key - b * KB + 1, 0, KB)
            if half:  # key by key, one fma each
                for j in range(KB):
                    use = live & (j < nkeys)
                    if not use.any():
                        break
                    on = np.where(use[:, None], fma32(p[:, j, None], vp[None, b * KB + j, :], on), on)
            pairs = 0 if half else (nkeys + 1) // 2
            for jp in range(0 if half else KB // 2):
                use = live & (jp < pairs)
                if not use.any():
                    break
                lone = (2 * jp + 1 == nkeys)[:, None]  # a last key alone in its pair: its partner is a zero key
                partner = np.where(lone, F32(0), vp[None, b * KB + 2 * jp + 1, :]).astype(F32)
                upd = dot_pair(p[:, 2 * jp, None], p[:, 2 * jp + 1, None], vp[None, b * KB + 2 * jp, :], partner, on)
                on = np.where(use[:, None], upd, on)
            m = np.where(live, mn, m)
            l = np.where(live, l_new, l)
            o = np.where(live[:, None], on, o)
        return rnd((o / l[:, None]).astype(F32))


def replay(q, k, v, scale, half=False):
    """torch-free: q [B, H, T, D], k, v [B, KV, S, D] float32 numpy arrays of bfloat16 values"""
    B, H = q.shape[:2]
    G = H // k.shape[1]
    out = np.zeros(q.shape, F32)
    for b in range(B):
        for h in range(H):
            out[b, h] = replay_head(q[b, h], k[b, h // G], v[b, h // G], scale, half)
    return out
