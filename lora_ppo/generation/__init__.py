"""The generation engine: the decode loop that samples exactly the distribution PPO scores, its KV
caches, continuous batching, the adapter folded for decoding, stop tokens. It knows nothing of PPO:
the loops (ppo/, stages/) call it, it never imports them.

    samples.py     Samples, left_pad, truncate_after_stop, stop_ids_of
    sampler.py     the decode state (draw, advance) and batched decoding
    continuous.py  continuous batching: admit, compact, shift left
    kv_cache.py    in-place surgery on transformers' caches
    folded.py      the policy folded into the base weights while decoding
    generate.py    `sample` (the decode loop) and `generate` (the policy's responses)
"""
