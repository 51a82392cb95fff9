"""Development tooling kept out of the installed package (benchmarks, reference models, tables)."""
