"""Prism's vLLM attention backend (vLLM glue; imports vLLM).

Modules:
    backend       PrismAttentionBackend, PrismMetadataBuilder, PrismAttentionImpl, PrismMetadata
    routing       host-only split of a batch into a FlashAttention prefix and a Prism suffix
    rope_source   a layer's RoPE layout read from the model's own rotary embedding
    workspace     process-wide pool of preallocated Prism scratch

Nothing is imported here: vLLM imports ``backend`` by its registered path when a model asks
for the backend, and registering the plugin imports none of this.
"""
