"""gRPC over HTTP/2 with the ``h2`` library: the local server's core.

It speaks standard gRPC (any gRPC client can call it: grpcio, Sift's sift_stream and sift_py). The
point of owning it is throughput: many length-prefixed messages arrive in one HTTP/2 DATA frame
and are handed to a handler in one call, where grpcio's server pays a round trip through its core
for every message. Clients use grpcio (unary calls) and sift_stream (data streams).
"""
