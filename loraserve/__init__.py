"""loraserve: the project's public gRPC contract (`loraserve.v1`, generated) and its code generator."""
