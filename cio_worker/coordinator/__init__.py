"""The coordinator: the farm's HTTP/JSON API in front of the queue (``cio-worker serve``).

Agents register, long-poll for claims, heartbeat and report; owners submit, read status, release,
kill and download. Stateless: every fact lives in the queue's database, so several coordinators can
serve one PostgreSQL behind a load balancer; with ``sqlite:///`` it is the one-machine farm.

Its web view (``web/``) shows jobs, tasks, frames and workers to a person signed in with an owner
token, reading frame previews and stored task logs from each job's storage.

May import: ``errors``, ``job``, ``imaging``, ``queue``, ``storage``. Needs the ``coordinator`` extra (FastAPI, uvicorn,
prometheus_client, Jinja2).
"""
