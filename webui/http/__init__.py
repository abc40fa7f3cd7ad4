"""The HTTP API: AUTOMATIC1111's ``/sdapi/v1`` routes, jobs that can be followed (``/api/v1/jobs``)
and OpenAI's images API, served beside the web app (``--api``) or alone (``--nowebui``).

* :mod:`webui.http.jobs`: the one queue in front of the device (pure Python, no web framework);
* :mod:`webui.http.auth`: the launch flags, their checks, HTTP Basic logins and API keys;
* :mod:`webui.http.a1111`: A1111 request bodies to :class:`~webui.request.GenerationRequest`, and
  results back to A1111's answers;
* :mod:`webui.http.routes`: the FastAPI application and how it is served.
"""

from __future__ import annotations
