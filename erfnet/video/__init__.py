"""Video (optional): sources and writers, the pipelined reader / network / writer, FPS reports."""
