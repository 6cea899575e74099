# presenced: the Rocket.Chat presence daemon.
#   docker build -t presenced .
#   docker run -e MONGO_URL='mongodb://mongo:27017/rocketchat?replicaSet=rs0' -p 3005:3005 presenced
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY presenced ./presenced
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 presenced
USER presenced
ENV PORT=3005
EXPOSE 3005
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"HEALTH_CHECK_PORT\", os.environ[\"PORT\"])}/health', timeout=2)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["presenced"]
CMD ["run"]
