# The operator image: `courier-operator` on a small non-root runtime.
#
#   docker build -f docker/courier-operator.Dockerfile -t courier-operator:dev .

FROM rust:1.90-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p courier-operator \
    && cp target/release/courier-operator /courier-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /courier-operator /usr/local/bin/courier-operator
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/courier-operator"]
CMD ["run"]
