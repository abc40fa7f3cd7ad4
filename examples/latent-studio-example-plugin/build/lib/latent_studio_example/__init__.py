"""An example Latent Studio plugin package."""
