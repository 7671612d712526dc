"""Built-in architectures (found through the mllm_bench.architectures entry points)."""
