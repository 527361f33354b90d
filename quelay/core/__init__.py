"""Sans-IO cores: no trio, no sockets, no files. Messages, transfer records,
failure codes and the peer protocol state machine."""
