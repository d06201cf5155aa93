"""Generated gRPC stubs of protos/hashret/v1/retrieval.proto: do not edit, run protos/generate.py."""
