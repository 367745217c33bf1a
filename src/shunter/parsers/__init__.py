"""Output parsers for the gRPC data plane: reasoning text and tool calls, whole or streamed."""
