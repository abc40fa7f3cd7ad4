"""Training and evaluating the shipped default model (a small latent diffusion model of shapes).

Only the model's author runs this, so it lives beside the app, not inside it: the ``webui``
package (what ``pip install`` ships) never imports it. From a checkout, ``python launch.py train``
and ``python launch.py evaluate`` reach it; training needs the packages in
``requirements-train.txt`` (``pip install -r requirements-train.txt``).

Modules: :mod:`training.shapes` (the procedural scenes and captions), :mod:`training.train` (the
recipe and the export to a diffusers folder), :mod:`training.analyse` (a deterministic reader of
generated pixels) and :mod:`training.evaluate` (the scores per task).
"""
