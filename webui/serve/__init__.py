"""Generation on a Ray Serve deployment (``launch.py --ray``): the engine runs in replicas, each
with its own model cache, routed by model with Ray Serve's model multiplexing; the web app, the
HTTP API and the CLI stay in this process and talk to the replicas through a deployment handle.

Nothing here imports Ray at module level: without ``--ray`` Ray is never imported.

* :mod:`webui.serve.replica`: the deployment (one engine per replica, a streamed ``generate``);
* :mod:`webui.serve.client`: :class:`~webui.serve.client.RayEngine`, the engine the front ends use
  (listings, fields and limits from a local engine that loads no model; generations on replicas).
"""
