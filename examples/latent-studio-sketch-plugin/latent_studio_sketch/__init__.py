"""Sketch to image: a Latent Studio plugin that conditions generation on drawn lines or a photo's
edges through an edges (canny, scribble, lineart) ControlNet."""
