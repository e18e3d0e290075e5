"""The job model, pure and runnable anywhere: frame specs, chunks, scouts and tiles, tokens,
environment merging, node paths, MD5 identity, the task document, our stand-in for a Clarisse
project, job specs and their expansion into task documents.

May import: ``cio_worker.errors`` only. No I/O beyond reading the files it is pointed at.
"""
