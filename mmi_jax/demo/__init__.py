"""What the CPU demo (`configs/demo.py`) adds to the training core, as training extensions.

`stand_ins` fits stand-ins for the pretrained weights the demo cannot download (CLIP's ViT,
SD's VAE and UNet, Vicuna): `vision_fit`, `vae_fit`, `llm_fit` and `decoder_fit`, all on one
loop (`fit_loop`). `shapes_evaluation` evaluates captions and generated pictures on held-out
shapes documents.
"""
