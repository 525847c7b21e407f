"""Pure algorithm code: trust matrices, aggregation, the personalized and FedCoLLM rounds."""
