# qmpd in a container: the QMP socket lives in the /run/qmpd volume.
#   docker build -t qmpd .
#   docker run --rm -v qmpd-run:/run/qmpd -v /srv/images:/images qmpd
# Reachable by a host user (socket owned by your uid, images at the same
# path inside and out, dashboard on the host's loopback):
#   mkdir -p run && docker run --rm --user "$(id -u):$(id -g)" \
#     -v "$PWD/run:/run/qmpd" -v /srv/images:/srv/images -p 127.0.0.1:8420:8420 \
#     qmpd --socket /run/qmpd/qmpd.sock --http 0.0.0.0:8420
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qmpd ./qmpd
COPY schema ./schema
RUN pip install --no-cache-dir . && rm -rf /src \
    && useradd --system --uid 10001 --user-group --home-dir /run/qmpd --shell /usr/sbin/nologin qmpd \
    && mkdir -p /run/qmpd && chown qmpd:qmpd /run/qmpd
# Not root: a client can only reach what this user may (add --allowed-dir to confine further).
USER qmpd
WORKDIR /run/qmpd
VOLUME ["/run/qmpd"]
EXPOSE 8420
ENTRYPOINT ["qmpd"]
CMD ["--socket", "/run/qmpd/qmpd.sock"]
