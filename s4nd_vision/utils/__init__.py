"""Process-wide helpers shared by training, the benchmarks and the demo: seeding and allocator settings."""
from .runtime import keep_freed_memory
