"""QUIC transport: aioquic's sans-IO connection driven by Trio over UDP."""
