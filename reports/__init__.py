"""Tables and plots from result records."""
