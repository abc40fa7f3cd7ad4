"""Built-in features, registered through the same hooks a community plugin uses."""
