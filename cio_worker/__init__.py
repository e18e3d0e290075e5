"""cio_worker: the render-node agent of a Conductor-style cloud farm for Clarisse."""

__version__ = "0.1.0"
