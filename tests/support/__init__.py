"""Shared test helpers: daemons on real sockets and a raw byte client."""
