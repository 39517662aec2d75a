"""The network: the Qwen2 decoder, its rotary embedding, KV caches, and the backends its ops run on."""

from qwen_ref.models.backends import TORCH, Backends, resolve_backends
from qwen_ref.models.kv_cache import CacheFullError, KVCache, RowCaches
from qwen_ref.models.qwen2 import QwenForCausalLM

__all__ = ["TORCH", "Backends", "CacheFullError", "KVCache", "QwenForCausalLM", "RowCaches", "resolve_backends"]
