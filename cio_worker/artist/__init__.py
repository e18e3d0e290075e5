"""The artist's workstation: submit a job (scan, hash, upload what the store lacks, enqueue),
read its status, download finished outputs into place.

May import: ``errors``, ``job``, ``imaging``, ``queue``, ``storage``. Never ``node``, ``sim`` or ``cli``.
"""
