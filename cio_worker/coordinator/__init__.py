"""The coordinator: the farm's HTTP/JSON API in front of the queue (``cio-worker serve``).

Agents register, long-poll for claims, heartbeat and report; owners submit, read status, release,
kill and download. Stateless: every fact lives in the queue's database, so several coordinators can
serve one PostgreSQL behind a load balancer; with ``sqlite:///`` it is the one-machine farm.

May import: ``errors``, ``job``, ``queue``. Needs the ``coordinator`` extra (FastAPI, uvicorn, prometheus_client).
"""
