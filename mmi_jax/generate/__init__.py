"""Generation: text with a KV cache, images with guided sampling.

`decoding` runs the LLM with its KV cache (prefill, decode steps, greedy decoding in one jit;
the MMFS layers keep sampling each token's images), `image_generation` draws images from the
image decoder with classifier-free guidance and decodes them with the VAE. Interleaved
generation (a document continued with text and images, SPEC 10) is built from both here.
"""
