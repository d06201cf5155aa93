"""hashret: deep-hashing image retrieval, from training to a gRPC service."""

__version__ = "0.1.0"
