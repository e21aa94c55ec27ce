"""gRPC over HTTP/2 with the ``h2`` library: a server core and a coalescing client-streaming client.

Both speak standard gRPC (any gRPC client can call the server; the client works against any gRPC
server, Sift included). The point of owning them is throughput: many length-prefixed messages travel
in one HTTP/2 DATA frame and are parsed in one pass, where grpcio pays a round trip through its core
for every message.
"""
