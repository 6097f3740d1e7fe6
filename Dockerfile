# casimg in a container: the service with its embedded Redis, data in the /data volume.
# Set CASIMG_REDIS_URL to use an external Redis (config/redis.conf) instead of the embedded one.
# tests/test_container.py checks this file and runs its CMD and HEALTHCHECK as the container would.
FROM python:3.11-slim

RUN useradd --system --create-home --uid 10001 casimg \
 && mkdir /data && chown casimg:casimg /data

WORKDIR /src
COPY setup.py setup.cfg README.md ./
COPY casimg ./casimg
RUN pip install --no-cache-dir '.[embedded]' && rm -rf /src

USER casimg
WORKDIR /data
VOLUME /data
EXPOSE 9000
# CASIMG_REDIS_URL empty: the embedded Redis, its append-only file in /data/redis.
ENV CASIMG_HOST=0.0.0.0 CASIMG_PORT=9000 CASIMG_DATA_DIR=/data CASIMG_REDIS_URL="" PYTHONUNBUFFERED=1

# Follows CASIMG_PORT, so `docker run -e CASIMG_PORT=...` stays healthy.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
  CMD python -c "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CASIMG_PORT', '9000'), timeout=2)"

# exec form: casimg is PID 1 and gets SIGTERM directly, so `docker stop` shuts it down cleanly.
CMD ["casimg", "serve"]
