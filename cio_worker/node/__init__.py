"""The render node: the agent that runs on every instance. Claims a task, syncs its inputs into
the instance's content cache and into place, builds the environment, runs cnode under the runner
(own session, masked log, kill ladder), judges and uploads the outputs, reports (through a durable
outbox that survives an unavailable queue and a restart); registers with its instance identity
and reports what it is doing; watches for preemption notices and drains.

May import: ``errors``, ``job``, ``imaging``, ``queue``, ``storage``. Never ``artist``, ``sim`` or ``cli``.
"""
