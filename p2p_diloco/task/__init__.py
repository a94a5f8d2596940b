"""The embedded task: a small byte-level Llama, its data, the device it runs on, and the in-process
simulator that trains it with the algorithm (`core`) on M simulated workers."""
