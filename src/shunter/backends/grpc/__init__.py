"""Workers reached over gRPC (SGLang's scheduler service): the gateway tokenizes, applies the
chat template, detokenizes and formats OpenAI or SGLang responses itself."""
