# The data plane image: the `courier` binary on a small non-root runtime.
#
#   docker build -f docker/courier.Dockerfile -t courier:dev .
#   docker build -f docker/courier.Dockerfile --build-arg FDB_VERSION=7.3.69 -t courier:fdb .
#
# With FDB_VERSION the binary is built with the FoundationDB engine (`--features fdb`) and the
# image carries that version's client library (libfdb_c); without it, the embedded store only.

ARG FDB_VERSION=""

FROM rust:1.90-bookworm AS build
ARG FDB_VERSION
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev curl \
    && rm -rf /var/lib/apt/lists/*
RUN if [ -n "$FDB_VERSION" ]; then \
      curl -fsSL -o /tmp/fdb.deb \
        "https://github.com/apple/foundationdb/releases/download/${FDB_VERSION}/foundationdb-clients_${FDB_VERSION}-1_amd64.deb" \
      && dpkg -i /tmp/fdb.deb && rm /tmp/fdb.deb; \
    fi
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    features=""; if [ -n "$FDB_VERSION" ]; then features="--features fdb"; fi; \
    cargo build --release --locked -p courier $features \
    && mkdir -p /out/lib && cp target/release/courier /out/courier \
    && if [ -n "$FDB_VERSION" ]; then cp /usr/lib/libfdb_c.so /out/lib/; fi

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/courier /usr/local/bin/courier
COPY --from=build /out/lib/ /usr/lib/
USER 10001:10001
EXPOSE 8080 7500
ENTRYPOINT ["/usr/local/bin/courier"]
CMD ["serve", "--listen", "0.0.0.0:8080", "--data-dir", "/var/lib/courier"]
