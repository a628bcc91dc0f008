"""Pure Flax Linen models: ViT image tower, text transformer, two-tower CLIP/SigLIP."""
