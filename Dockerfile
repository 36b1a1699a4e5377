FROM python:3.11-slim
WORKDIR /opt/syncd
COPY pyproject.toml README.md ./
COPY syncd ./syncd
RUN pip install --no-cache-dir . && useradd --system --home /data syncd && mkdir /data && chown syncd /data
USER syncd
ENV SYNCD_SYNCD__DATA_DIR=/data
ENTRYPOINT ["syncd"]
CMD ["run", "--config", "/etc/syncd/syncd.toml"]
