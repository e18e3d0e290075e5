"""The command line (``cio-worker``): one module per group of commands, ``main`` the entry point.

May import anything in the package; nothing imports it. Keep this file empty of imports so that
``cio-worker --version`` starts without loading the cloud SDKs.
"""
