"""Stage 2: a vision-language model on vLLM judges each slot of three keyframes."""
