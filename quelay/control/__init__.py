"""Local control protocol: server and message validation."""
