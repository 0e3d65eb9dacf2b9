"""Small utilities shared by every room: errors, module helpers, batches of any structure, reading files from others
without running their code, and the CPU allocator settings."""
