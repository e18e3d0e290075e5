"""Stand-ins for what a real farm provides, and the one-machine simulation of a whole job:
the cnode simulator (``cnode-sim``, real PNGs), the metadata server of GCE/EC2/Azure, the
shipped example shot, and ``simulate`` (a queue, a store, N agent processes, the downloader).

May import: ``errors``, ``job``, ``imaging``, ``queue``, ``storage``, ``artist``, ``node``. Never ``cli``.
"""
