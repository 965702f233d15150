"""Helpers shared by training, the benchmarks, the demo and the commands: seeding, allocator settings, and
model specs on command lines, result files written atomically."""
from .files import remove_temporaries, replaced_atomically
from .model_spec import parse_model_spec
from .runtime import keep_freed_memory
from .seeding import seed_all, seed_from
