# The GPU node (`procure gpu-worker`): a small, non-root image without build tools. It runs beside
# Ollama on a GPU machine (see docker-compose.yml and docs/gpu-node.md).

# Build stage: the project and its dependencies into a virtual environment.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/procure
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/procure/bin/pip install .

# Final stage: the virtual environment alone, run as an unprivileged user.
FROM python:3.11-slim
ENV PATH=/opt/procure/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# NVML comes from the host's driver, mounted by the NVIDIA container toolkit when the container
# asks for the `utility` capability (docker-compose.yml does); the image carries no driver.
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=utility
COPY --from=build /opt/procure /opt/procure
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin procure
USER 10001
WORKDIR /tmp
EXPOSE 9876
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9876/healthz', timeout=4)"]
ENTRYPOINT ["procure", "gpu-worker", "--host", "0.0.0.0", "--port", "9876"]
