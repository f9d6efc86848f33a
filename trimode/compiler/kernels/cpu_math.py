"""Math the CPU kernels inline into their loops (PrimExpr builders, not kernels)."""
from __future__ import annotations

from tvm import tirx

# Softmax weights below e^-69 (~2^-100) of the max are flushed to zero: times any fp16 value
# (>= 2^-24) they would make products under fp32's normal range, and each denormal costs the
# CPU a microcode assist (a default-model decode at fill 3968 took 4.9 ms with them, 1.0 ms
# without); what they add is under 1e-30 of a row's sum.
FLUSH_BELOW = -69.0


def exp_approx(x):
    """e^x in float32 that vectorizes (llvm.exp lowers to libm's expf, a scalar call per
    element: 15% of a long-context decode's CPU time in perf): Cephes' expf, x = n ln2 + f,
    a degree-7 polynomial in f times 2^n from the exponent bits; relative error under 1e-7
    for x in [-87.3, 88.3] (inputs clamped to it, so e^-inf is 2^-126, not 0)."""
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = tirx.max(tirx.min(x, f32(88.3762626647949)), f32(-87.3365447504))
    n = tirx.floor(x * f32(1.44269504088896341) + f32(0.5))
    f = x - n * f32(0.693359375) + n * f32(2.12194440e-4)
    p = f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * f + f32(c)
    p = p * f * f + f + f32(1)
    return p * tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))


def softmax_weight(x, exp=exp_approx):
    """exp(x) for x = a score less its row's max (<= 0), or 0 where that is negligible."""
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    return tirx.Select(x < f32(FLUSH_BELOW), f32(0), exp(x))
