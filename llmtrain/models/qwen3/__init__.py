"""The Qwen3 dense family: Llama plus RMSNorm per head on queries and keys (before RoPE), a free head_dim.

`family.py` (registry entry, formulas), `model.py` (reference nn.Module), `hf.py` (Qwen3ForCausalLM
adapter), `megatron.py` (Megatron-Core mapping: qk_layernorm).
"""
