"""Gateway-side tokenization for the gRPC data plane: tokenizer and chat template,
incremental detokenization, stop sequences."""
