"""One JAX codebase for ViT, CLIP/SigLIP, DiT and a vision-language decoder."""
