"""tiered_kv: a KV cache bigger than GPU memory."""
