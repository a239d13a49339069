# qmpd in a container: the QMP socket lives in the /run/qmpd volume.
#   docker build -t qmpd .
#   docker run --rm -v qmpd-run:/run/qmpd -v /srv/images:/images qmpd
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qmpd ./qmpd
COPY schema ./schema
RUN pip install --no-cache-dir . && rm -rf /src
VOLUME ["/run/qmpd"]
ENTRYPOINT ["qmpd"]
CMD ["--socket", "/run/qmpd/qmpd.sock"]
