"""The farm's web view, served by the coordinator at ``/``: jobs, one job's tasks and frames, a
task's attempts and log, workers; an owner's controls (release, kill, retry).

Server-rendered HTML (Jinja2, autoescaped) with a little plain JavaScript that polls small
endpoints under ``/live/`` and swaps in fragments the server rendered, so every byte of a job
title or a log line is escaped in one place. Signing in with an owner token opens a session kept
in the queue's database (only a digest of its id); every page needs one, every POST form carries
a CSRF token derived from it. Frame previews and stored task logs are read from the job's storage.

May import: ``errors``, ``job``, ``queue``, ``storage`` (and the coordinator's own modules).
"""
