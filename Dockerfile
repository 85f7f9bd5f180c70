# A minimal CPU image: the embedded models, the shipped personas, the server on 0.0.0.0:8000.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends espeak-ng sox && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements/ requirements/
RUN pip install --no-cache-dir -r requirements/base.txt \
 && pip install --no-cache-dir --no-deps -r requirements/nodeps.txt
COPY pyproject.toml README.md ./
COPY npc_server/ npc_server/
COPY personas/ personas/
RUN pip install --no-cache-dir --no-deps .
ENV NPC_HOST=0.0.0.0 NPC_DATA_DIR=/data NPC_PERSONAS_DIR=/app/personas
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["npc-server", "serve"]
