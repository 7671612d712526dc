"""The mllm-bench command line."""
