"""Triton kernels for qwen_ref, each beside the PyTorch reference it must match. Import name: qwen_ref_kernels.

    rms_norm(x, weight, eps, residual=None)             RMSNorm in HF's casting order, optionally fused with the add
    attention(q, k, v, *, causal=True, scale=None)      prefill: FlashAttention-2 forward, GQA, bottom-right causal
    decode_attention(q, k_cache, v_cache, seq_lens)     decode: split-KV flash-decoding over per-row cache lengths

Triton picks compiler or interpreter when a kernel is decorated, i.e. when this package is imported: on a machine
without a GPU, set TRITON_INTERPRET=1 before the import and pass CPU tensors (see docs/kernels.md).
"""

# This folder is installed as `qwen_ref_kernels`. Reached under its folder name (the repo root on sys.path) it stays
# empty on purpose: `kernels` is also HF's hub-kernel loader, which transformers probes by importing that name.
if __name__ == "qwen_ref_kernels":
    from ._common import INTERPRET
    from .attention import attention, attention_ref
    from .decode_attention import decode_attention, decode_attention_ref
    from .rms_norm import rms_norm, rms_norm_ref

    __all__ = [
        "INTERPRET",
        "attention",
        "attention_ref",
        "decode_attention",
        "decode_attention_ref",
        "rms_norm",
        "rms_norm_ref",
    ]
