# The twostage image: the wheel built from this checkout, installed with the lock (constraints.txt).
# docker-compose.yml builds it for every app service. CPU torch by default; for a GPU build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX_URL" \
 && pip install --no-cache-dir -c /tmp/constraints.txt /dist/twostage-*.whl \
 && rm -rf /dist
WORKDIR /var/lib/twostage
ENV TWOSTAGE_DATA_DIR=/var/lib/twostage/data TWOSTAGE_CACHE_DIR=/var/lib/twostage/cache
ENTRYPOINT ["twostage"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
