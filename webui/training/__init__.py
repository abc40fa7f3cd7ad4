"""Training and evaluating the embedded default model (a small latent diffusion model of shapes)."""
