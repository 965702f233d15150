"""Process-wide helpers shared by training, the benchmarks and the demo: seeding and allocator settings."""
from .runtime import keep_freed_memory
from .seeding import seed_all, seed_from
