# tierbatch: one image for every process (api, worker, beat, migrate, simulator); see docker-compose.yml.

# -- build wheels (a compiler is here for architectures without binary wheels)
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --wheel-dir /wheels .

# -- runtime
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels tierbatch \
 && rm -rf /wheels \
 && useradd --create-home --uid 10001 tierbatch \
 && mkdir -p /app/.tierbatch /app/files \
 && chown tierbatch:tierbatch /app/.tierbatch /app/files
WORKDIR /app
# beat keeps its schedule state under /app/.tierbatch and tenants' files live under /app/files (a volume):
# the only directories the unprivileged user may write
USER tierbatch
# 8000: the API; 8100: the simulator, reached by the worker on the compose network (never published)
EXPOSE 8000 8100
CMD ["tierbatch", "--help"]
