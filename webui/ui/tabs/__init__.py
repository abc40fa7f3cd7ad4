"""The built-in tabs, one module each, contributed through the ``register_ui_tabs`` hook."""
