"""Duplex: the generated gRPC contracts (duplex.<domain>.v1), the shared service kit and the CLI."""
