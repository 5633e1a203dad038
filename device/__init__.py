"""What the machine is and how models fit on it: the device profile (psutil, NVML, the
llama.cpp build), the pure offload planner, live monitoring and benchmark figures.

Imports nothing else of pcrt (``runtime.planning`` adapts GGUF metadata to the planner).
"""
