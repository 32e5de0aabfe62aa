# syntax=docker/dockerfile:1
#
# BLACKSKY-MD: one static Go binary in a small image. Used by docker compose
# (docker-compose.yml) and by Heroku's container stack (heroku.yml).

# --- build: a static binary (pure-Go SQLite, so no cgo) ---
FROM golang:1.26 AS build
WORKDIR /src
# Modules first, so a code change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" \
      -o /out/blacksky ./cmd/blacksky

# --- runtime ---
# Alpine rather than distroless: Heroku runs CMD and the heroku.yml commands
# through /bin/sh, and streams release-phase logs only when curl is present.
FROM alpine:3.22
RUN apk add --no-cache ca-certificates tzdata curl \
 && adduser -D -H -u 10001 -s /sbin/nologin blacksky \
 && install -d -o blacksky -g blacksky -m 1777 /data
# /data is world-writable (sticky, like /tmp) because Heroku may run the
# container under a uid of its own; under docker compose only the blacksky
# user writes there, and a named volume copies this owner and mode.
COPY --from=build /out/blacksky /usr/local/bin/blacksky
USER blacksky
WORKDIR /data
ENV DATA_DIR=/data \
    PORT=8080
EXPOSE 8080
# The binary checks /healthz itself: no curl needed for this. Heroku ignores
# HEALTHCHECK; the gateway and backup containers in compose switch it off,
# since only the health service listens on $PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["blacksky", "healthcheck"]
# SIGTERM reaches the binary directly (exec form): it closes the WhatsApp
# socket, takes the shutdown snapshot and exits within SHUTDOWN_TIMEOUT.
CMD ["blacksky", "run"]
