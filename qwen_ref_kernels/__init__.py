"""Triton kernels for qwen_ref, each beside the PyTorch reference it must match. Import name: qwen_ref_kernels.

    rms_norm(x, weight, eps, residual=None)             RMSNorm in HF's casting order, optionally fused with the add
    attention(q, k, v, *, causal=True, scale=None)      prefill: FlashAttention-2 forward, GQA, bottom-right causal
    decode_attention(q, k_cache, v_cache, seq_lens)     decode: split-KV flash-decoding over per-row cache lengths

and CPU kernels (C++, one module compiled on first use), each imported from its module:

    qwen_ref_kernels.invariant_linear.invariant_linear(x, weight, bias=None)
                                                        decode-step linear whose rows do not depend on the batch
    qwen_ref_kernels.flash_prefill.flash_prefill(q, k, v, scale)
                                                        bfloat16 or float16 causal prefill attention, one pass

Triton picks compiler or interpreter when a kernel is decorated, i.e. when its module is first imported: on a machine
without a GPU, set TRITON_INTERPRET=1 before the import and pass CPU tensors (see docs/kernels.md).
"""

import importlib

# Triton kernels are imported on first use, so that importing the CPU kernel (qwen_ref_kernels.invariant_linear)
# neither needs triton nor fixes Triton's compiler/interpreter choice before TRITON_INTERPRET is set.
_WHERE = {
    "INTERPRET": "_common",
    "attention": "attention",
    "attention_ref": "attention",
    "decode_attention": "decode_attention",
    "decode_attention_ref": "decode_attention",
    "rms_norm": "rms_norm",
    "rms_norm_ref": "rms_norm",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'qwen_ref_kernels' has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE[name]}", __name__)
    for other, where in _WHERE.items():  # the functions replace their same-named modules as attributes
        if where == _WHERE[name]:
            globals()[other] = getattr(module, other)
    return globals()[name]
