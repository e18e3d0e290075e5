# A render node in a container, for the local simulation where a Docker engine exists
# (images/compose/docker-compose.yml). The cnode simulator stands in for Clarisse.
FROM python:3.11-slim
RUN useradd --create-home render
WORKDIR /opt/cio-worker
COPY pyproject.toml README.md ./
COPY cio_worker ./cio_worker
RUN pip install --no-cache-dir . && mkdir -p /opt/cnode-sim/bin \
    && python -c "from pathlib import Path; from cio_worker.sim.cnode import install_cnode_shim; install_cnode_shim(Path('/opt/cnode-sim/bin'))"
ENV PATH=/opt/cnode-sim/bin:$PATH
USER render
ENTRYPOINT ["cio-worker"]
CMD ["agent", "--help"]
