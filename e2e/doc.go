// Package e2e runs the docker compose topology as real processes of the
// built binary (gateway, backup, health over TCP NATS with a token, real
// PostgreSQL) and checks backup, status, shutdown and restore end to end.
package e2e
